#!/usr/bin/env bash
# `settle bench replica` against a private primary and a hot standby of it, both made here with
# the installed server's own initdb / pg_basebackup (as settle's replica test does), so the
# primary's CPU figure counts only the benchmark. Usage (after `cargo build --release`):
#   bench/replica.sh [settle bench replica options, e.g. --runs 3 --transactions 10000000]
# The clusters live under a temporary directory, removed at exit. Run as root or postgres.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
dir=$(mktemp -d /tmp/settle-replica-bench.XXXXXX)
primary_port=${PRIMARY_PORT:-55432}
standby_port=${STANDBY_PORT:-55433}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
cleanup() {
    as_pg "$bin/pg_ctl" -D "$dir/standby" -m immediate stop >/dev/null 2>&1 || true
    as_pg "$bin/pg_ctl" -D "$dir/primary" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
as_pg "$bin/initdb" -D "$dir/primary" -A trust -U postgres -E UTF8 --locale=C >/dev/null
# The settings settle's benchmarks ran with on the shared server; the rest are initdb's defaults
# (wal_level replica, 10 WAL senders).
as_pg "$bin/pg_ctl" -D "$dir/primary" -l "$dir/primary.log" -w \
    -o "-p $primary_port -k $dir -c autovacuum=off -c max_connections=200" start >/dev/null
as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres -D "$dir/standby" \
    -R -c fast -X stream >/dev/null
as_pg "$bin/pg_ctl" -D "$dir/standby" -l "$dir/standby.log" -w \
    -o "-p $standby_port -k $dir -c max_connections=200" start >/dev/null
echo "primary on $primary_port, hot standby on $standby_port, under $dir"
SETTLE_DATABASE__URL="postgres://postgres@127.0.0.1:$primary_port/postgres" \
    ./target/release/settle bench replica \
    --read-url "postgres://postgres@127.0.0.1:$standby_port/postgres" "$@"
