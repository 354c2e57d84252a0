//! # settle
//!
//! Flash-sale ordering that never oversells, and settlement of millions of payment
//! transactions as checkpointed, resumable, cancellable jobs on a durable Postgres queue.
//!
//! # Layout
//!
//! The domain (`orders`, `settlement`, `idempotency`, …) never imports [`http`]: it says what
//! went wrong in its own error types, and only `http/` knows HTTP (axum, status codes, request
//! and response shapes, OpenAPI); `http/error.rs` maps each domain error to a status and code.
//!
//! - [`cli`]: the `settle` subcommands; wiring only.
//! - [`config`]: `config.toml` + environment, validated at start.
//! - [`db`]: pool, database creation; `db/migrate.rs`: migrating, and the migration check.
//! - [`commit`](mod@commit): committing a request's transaction, and finding out whether a
//!   commit whose reply was lost took effect.
//! - [`local_cluster`]: the private PostgreSQL cluster `serve` starts when none is running.
//! - [`http`]: the HTTP API (routers, request/response shapes, error mapping, OpenAPI, the
//!   `Idempotency-Key` header).
//! - [`orders`]: products and orders, the no-oversell statement, the coalescer, and finding
//!   out whether orders were placed when a commit reply is lost.
//! - [`idempotency`]: idempotency keys' storage (lock, look up, store, prune).
//! - [`tokens`]: API tokens and roles (create, list, revoke, authenticate), stored as hashes.
//! - [`seed`]: demo data at scale via COPY.
//! - [`settlement`]: transactions in, per-merchant daily settlements out, as checkpointed batches.
//! - [`bench`](mod@bench): benchmarks that print their ratio to the raw Postgres rate.
//! - [`schedule`]: the daily settlement each worker process enqueues once per day.
//! - [`worker`]: the worker process (the queue itself is the `settle-workers` crate).
//! - [`operator`]: `settle jobs list|show|cancel|retry`, the queue for operators.
//! - [`jobs`]: settle's small job kinds for tests and benchmarks (noop, sleep, fail, panic, count,
//!   transient, stubborn, final_step), registered only with `worker.test_kinds = true`.
//! - [`metrics`]: the Prometheus recorder, the names settle records under, the queue gauges.
//! - [`shutdown`], [`telemetry`]: signals and logging.

pub mod bench;
pub mod cli;
pub mod commit;
pub mod config;
pub mod db;
pub mod http;
pub mod idempotency;
pub mod jobs;
pub mod local_cluster;
pub mod metrics;
pub mod operator;
pub mod orders;
pub mod schedule;
pub mod seed;
pub mod settlement;
pub mod shutdown;
pub mod telemetry;
pub mod tokens;
pub mod worker;
