//! Logging: `tracing` to stderr, filtered by `SETTLE_LOG` (default `info`), as JSON when
//! `SETTLE_LOG_FORMAT=json`. Every request's lines carry its request id through its span.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("SETTLE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not for a log file or `docker logs`.
        .with_ansi(std::io::stderr().is_terminal());
    let json = std::env::var("SETTLE_LOG_FORMAT").is_ok_and(|f| f == "json");
    // A second init (tests calling into the library twice) is harmless: keep the first.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
