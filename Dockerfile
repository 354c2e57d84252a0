# One image for every settle process; the compose file picks the subcommand.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/settle /usr/local/bin/settle
COPY config.toml /etc/settle/config.toml
ENV SETTLE_CONFIG=/etc/settle/config.toml
ENTRYPOINT ["settle"]
