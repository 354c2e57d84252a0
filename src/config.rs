//! Configuration: `config.toml`, then the conventional `DATABASE_URL`, `PORT`, `WORKERS` and
//! `BATCH_SIZE`, then `SETTLE_*` environment variables, each layer overriding the one before:
//! the service's own name for a key wins over the conventional one (a shell that exports
//! `DATABASE_URL` for other tools must not redirect `SETTLE_DATABASE__URL=… settle …`).
//!
//! Every struct denies unknown fields, so a misspelt key fails at start with its name, and every
//! value is checked by `Config::validate` before anything connects anywhere.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

mod validate;

/// The whole configuration of one settle process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub http: HttpConfig,
    pub pagination: PaginationConfig,
    pub orders: OrdersConfig,
    pub idempotency: IdempotencyConfig,
    pub worker: WorkerConfig,
    pub settlement: SettlementConfig,
    pub auth: AuthConfig,
    pub schedule: ScheduleConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Where the data lives; `settle migrate` creates this database if it is missing.
    pub url: String,
    /// Upper bound of each process's connection pool.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before failing with 503.
    pub acquire_timeout_ms: u64,
    /// Apply pending migrations when `api`/`worker` start instead of refusing to run.
    pub migrate_on_start: bool,
    /// How long one try of a migration waits for a lock before it rolls back and is tried
    /// again later (see [`crate::db::migrate`]); 0 waits as long as it takes.
    pub migration_lock_timeout_ms: u64,
    /// `serve` only: start a private cluster when nothing answers at a loopback `url` (see
    /// [`crate::local_cluster`]). Unset, [`Config::from_figment`] makes it true for the
    /// built-in `url` alone: a URL named in a file or the environment is used as given. The
    /// default `config.toml` leaves it unset, so a copy of it with another url does not ask
    /// for a cluster there.
    #[serde(default)]
    pub local_cluster: bool,
    /// Where that private cluster keeps its data (relative to the working directory).
    pub local_data_dir: String,
    /// The PostgreSQL server's `bin` directory for that cluster; unset searches
    /// `/usr/lib/postgresql/*/bin`, then `PATH`.
    pub local_bin_dir: Option<String>,
    /// A streaming replica of `url` where settlement jobs read their batches (see
    /// [`crate::settlement::replica`]); unset reads on the primary.
    pub read_url: Option<String>,
    /// How long a settlement job waits for that replica to replay past its fixed input before
    /// it reads on the primary instead.
    pub read_max_wait_ms: u64,
    /// The longest one batch may read on that replica; past it (or on any error there) the
    /// batch, and the rest of that run, read on the primary.
    pub read_batch_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Interface to bind.
    pub host: String,
    /// Port to bind; 0 picks any free port (the bound address is logged).
    pub port: u16,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Requests running longer than this are answered with 503; also how long a shutdown
    /// waits for open connections.
    pub request_timeout_ms: u64,
    /// A connection whose request head (request line and headers) takes longer than this to
    /// arrive is closed.
    pub header_read_timeout_ms: u64,
    /// Connections the kernel may hold completed but not yet accepted (`listen(2)`'s backlog;
    /// Linux caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// A CSV download whose reader takes nothing for this long is cut off (a streamed body
    /// outlives `request_timeout_ms`; a stalled one would hold its snapshot open).
    pub download_stall_timeout_ms: u64,
    /// CSV downloads one API streams at once, each on a database connection of its own.
    pub max_concurrent_downloads: u32,
}

/// Page sizes of every list endpoint, so one client paging orders and jobs meets one rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaginationConfig {
    /// Page size when the request gives no `limit`.
    pub default_page_size: i64,
    /// Largest `limit` a client may ask for (422 above).
    pub max_page_size: i64,
}

/// The largest `orders.max_batch`: a batch's orders travel as arrays in one statement.
pub const MAX_ORDER_BATCH: usize = 10_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersConfig {
    /// Largest quantity one order may ask for (422 above).
    pub max_quantity: i32,
    /// Place concurrent orders for one product in one transaction (see `orders::coalesce`).
    pub coalesce: bool,
    /// Most orders one coalesced transaction places.
    pub max_batch: usize,
    /// How long a coalesced transaction may take before its connection is taken for lost.
    pub batch_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a stored response is replayed for an `Idempotency-Key`.
    pub ttl_hours: i64,
    /// How often each worker process deletes expired keys.
    pub prune_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs one worker process runs at once (env `WORKERS`).
    pub concurrency: usize,
    /// Rows per checkpointed batch of a long job (env `BATCH_SIZE`).
    pub batch_size: i64,
    /// How long a claim stays valid without a heartbeat before another worker may take the job.
    pub lease_ms: u64,
    /// How often a worker extends the leases of the jobs it holds.
    pub heartbeat_ms: u64,
    /// On shutdown, how long running jobs get to reach a checkpoint before they are aborted
    /// (their leases are released either way).
    pub shutdown_grace_ms: u64,
    /// Fallback poll interval when no NOTIFY arrives.
    pub poll_interval_ms: u64,
    /// How often a worker probes the other workers' liveness locks.
    pub rescue_probe_ms: u64,
    /// How long a worker's lock must stay free before its jobs are rescued.
    pub rescue_grace_ms: u64,
    /// Jobs claimed per claim statement.
    pub claim_batch: i64,
    /// Attempts before a failing job becomes FAILED: stored in each job by the process that
    /// enqueues it (the API, or a worker's schedule).
    pub max_attempts: i32,
    /// First retry delay; doubles each attempt, with jitter.
    pub backoff_base_ms: u64,
    /// Cap of a retry delay before its jitter (up to 25 % more).
    pub backoff_max_ms: u64,
    /// Finished jobs older than this are deleted.
    pub retention_hours: u64,
    /// How often each worker tries to delete them (one at a time does, under an advisory lock).
    pub retention_interval_ms: u64,
    /// Dead rows in the jobs table past which a worker vacuums it; 0 leaves it to autovacuum.
    pub vacuum_dead_rows: i64,
    /// How often each worker reads the jobs table's dead rows.
    pub vacuum_interval_ms: u64,
    /// Transient database errors in a row (without the job's checkpoint moving) retried without
    /// spending an attempt; the next one fails the attempt.
    pub max_transient_retries: u32,
    /// How long one attempt may run before it is aborted and failed, for kinds not in
    /// `timeouts`.
    pub job_timeout_ms: u64,
    /// Register the queue's probe kinds (`crate::jobs`) besides settlement: tests and
    /// `settle bench queue` need them, a production worker must not claim them.
    pub test_kinds: bool,
    /// Attempt timeouts by job kind (ms), overriding `job_timeout_ms`.
    #[serde(default)]
    pub timeouts: BTreeMap<String, u64>,
    /// Per-kind settings (`[worker.kinds.<kind>]`), for the kinds that need their own.
    #[serde(default)]
    pub kinds: BTreeMap<String, KindConfig>,
    /// Where a `settle worker` process serves `GET /metrics` (its own job counters: it has no
    /// API port); unset, it serves none. `serve` and `api` serve `/metrics` on the API port.
    /// (Left out when unset, so `[worker]` serialized and read back stays valid.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

/// One job kind's settings in a worker (`[worker.kinds.<kind>]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KindConfig {
    /// Most jobs of this kind one worker process runs at once (within `worker.concurrency`),
    /// so a burst of them leaves slots and connections to the other kinds. Signed so that a
    /// negative value is refused with the key named, like zero.
    pub concurrency: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettlementConfig {
    /// IANA time zone whose calendar days settlements are grouped by.
    pub time_zone: String,
    /// Legacy, read only: where a CSV of a job finished before results moved into Postgres
    /// (migration 0009) is still served from.
    pub results_dir: PathBuf,
    /// Longest `from..=to` span one job may cover, in days.
    pub max_span_days: i64,
    /// Largest array `POST /api/v1/transactions` accepts.
    pub max_transactions_per_request: usize,
    /// Disjoint id sub-ranges (parts) one settlement job aggregates concurrently (about the
    /// cores Postgres can give one job); a larger input is cut into more parts, taken in turn.
    pub parallel_parts: u32,
    /// No longer read: a finishing job corrects its sums by the rows changed while it ran on
    /// any number of days (`settlement::finalize`, migration 0021). Accepted so that a
    /// config.toml of the release that had it still loads; `settle` warns when it is set.
    pub revised_days_max: Option<i64>,
    /// How long a noted revision of `transactions` is kept before a finished job prunes it
    /// (it is kept longer while a live run's mark is below it).
    pub revision_retention_hours: i64,
}

/// API tokens (`settle tokens`, `http/auth.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// How long an api process trusts a token it verified before asking the database again:
    /// a revoked token stops working within this time. 0: every request asks.
    pub cache_ttl_ms: u64,
}

/// The daily settlement every worker process schedules (see `crate::schedule`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Enqueue a settlement of the previous day once a day.
    pub enabled: bool,
    /// Local time of day (`HH:MM` or `HH:MM:SS`) from which the previous day is due.
    pub at: String,
    /// IANA zone of `at` and of "the previous day"; `settlement.time_zone` when absent.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Longest sleep between two looks at the clock.
    pub check_interval_ms: u64,
    /// After downtime, how many of the most recent missed days are enqueued.
    pub catch_up_days: u64,
}

impl ScheduleConfig {
    /// `at` as a time of day, if it is one.
    pub fn at_time(&self) -> Option<chrono::NaiveTime> {
        ["%H:%M:%S", "%H:%M"]
            .iter()
            .find_map(|format| chrono::NaiveTime::parse_from_str(&self.at, format).ok())
            // chrono reads a leap second (`23:59:60`) as a time past 23:59:59, which would
            // strike a day late: the wall clock of a time zone never shows it.
            .filter(|at| chrono::Timelike::nanosecond(at) < 1_000_000_000)
    }
}

/// A configuration that could not be loaded, naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

/// The defaults, shipped as the documented `config.toml` and compiled in so a binary run from
/// any directory still has every key.
pub const DEFAULT_TOML: &str = include_str!("../config.toml");

/// [`DEFAULT_TOML`] as a provider of its own name, so a value can be told to come from the
/// defaults rather than from a file or variable that names it (a test's TOML string too).
struct Defaults;

impl Defaults {
    const NAME: &str = "settle's built-in defaults (config.toml)";
}

impl Provider for Defaults {
    fn metadata(&self) -> Metadata {
        Metadata::named(Self::NAME)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(DEFAULT_TOML).data()
    }
}

impl Config {
    /// Loads defaults, then the file `path` (which must exist), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Self::defaults();
        if let Some(path) = path {
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(figment.merge(env_layer()))
    }

    /// Extracts and validates a configuration from any figment (tests layer their own values).
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        // Unless set, a private cluster stands in for the built-in URL alone: one the user
        // named (in any file or variable) is used as given, and nothing answering there is an
        // error that names it.
        if figment.find_value("database.local_cluster").is_err() {
            config.database.local_cluster = figment
                .find_metadata("database.url")
                .is_some_and(|m| m.name == Defaults::NAME);
        }
        Ok(config)
    }

    /// Figment with only the compiled-in defaults, for tests and tools to layer on.
    pub fn defaults() -> Figment {
        Figment::from(Defaults)
    }
}

/// The conventional unprefixed names, then the `SETTLE_SECTION__KEY` variables over them.
fn env_layer() -> Figment {
    Figment::new()
        .merge(
            Env::raw()
                .only(&["DATABASE_URL"])
                .map(|_| "database.url".into()),
        )
        .merge(Env::raw().only(&["PORT"]).map(|_| "http.port".into()))
        .merge(
            Env::raw()
                .only(&["WORKERS"])
                .map(|_| "worker.concurrency".into()),
        )
        .merge(
            Env::raw()
                .only(&["BATCH_SIZE"])
                .map(|_| "worker.batch_size".into()),
        )
        .merge(
            // Not configuration: the config file's path, the log's filter and format, and the
            // test suite's own switches (tests/common), which a developer may leave exported.
            Env::prefixed("SETTLE_")
                .ignore(&["CONFIG", "LOG", "LOG_FORMAT", "TEST_KEEP_DB", "FUZZ_TOKEN"])
                .split("__"),
        )
}

#[cfg(test)]
mod tests;
