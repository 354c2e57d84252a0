//! Configuration: `config.toml`, then `SETTLE_*` environment variables, then the conventional
//! `DATABASE_URL`, `PORT`, `WORKERS` and `BATCH_SIZE`, each layer overriding the one before.
//!
//! Every struct denies unknown fields, so a misspelt key fails at start with its name, and every
//! value is checked by [`Config::validate`] before anything connects anywhere.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

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
    /// `serve` only: start a private cluster when nothing answers at a loopback `url` and
    /// `DATABASE_URL` is not set (see [`crate::local_cluster`]).
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
    /// Requests running longer than this are answered with 503.
    pub request_timeout_ms: u64,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrdersConfig {
    /// Largest quantity one order may ask for (422 above).
    pub max_quantity: i32,
    /// Place concurrent orders for one product in one transaction (see `orders::coalesce`).
    pub coalesce: bool,
    /// Most orders one coalesced transaction places.
    pub max_batch: usize,
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
    /// Attempts before a failing job becomes FAILED.
    pub max_attempts: i32,
    /// First retry delay; doubles each attempt, with jitter.
    pub backoff_base_ms: u64,
    /// Longest retry delay.
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
    /// Where finished CSV files are written and served from.
    pub results_dir: PathBuf,
    /// Longest `from..=to` span one job may cover, in days.
    pub max_span_days: i64,
    /// Largest array `POST /api/v1/transactions` accepts.
    pub max_transactions_per_request: usize,
    /// Disjoint id sub-ranges one settlement job aggregates concurrently (about the cores
    /// Postgres can give one job).
    pub parallel_parts: u32,
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
}

impl ScheduleConfig {
    /// `at` as a time of day, if it is one.
    pub fn at_time(&self) -> Option<chrono::NaiveTime> {
        ["%H:%M:%S", "%H:%M"]
            .iter()
            .find_map(|format| chrono::NaiveTime::parse_from_str(&self.at, format).ok())
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

impl Config {
    /// Loads defaults, then `path` if it exists, then the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = path {
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(figment.merge(env_layer()))
    }

    /// Extracts and validates a configuration from any figment (tests layer their own values).
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Figment with only the compiled-in defaults, for tests and tools to layer on.
    pub fn defaults() -> Figment {
        Figment::from(Toml::string(DEFAULT_TOML))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: &str| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                problem: problem.to_owned(),
            })
        };
        if !self.database.url.starts_with("postgres://")
            && !self.database.url.starts_with("postgresql://")
        {
            return invalid("database.url", "must be a postgres:// URL");
        }
        if let Some(read_url) = &self.database.read_url
            && !read_url.starts_with("postgres://")
            && !read_url.starts_with("postgresql://")
        {
            return invalid("database.read_url", "must be a postgres:// URL");
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        if self.http.max_body_bytes < 1024 {
            return invalid("http.max_body_bytes", "must be at least 1024");
        }
        if !(1..=1_000_000).contains(&self.orders.max_quantity) {
            return invalid("orders.max_quantity", "must be between 1 and 1000000");
        }
        if self.orders.max_batch == 0 {
            return invalid("orders.max_batch", "must be at least 1");
        }
        let pages = &self.pagination;
        if !(1..=pages.max_page_size).contains(&pages.default_page_size) {
            return invalid(
                "pagination.default_page_size",
                "must be between 1 and pagination.max_page_size",
            );
        }
        if self.idempotency.ttl_hours < 1 {
            return invalid("idempotency.ttl_hours", "must be at least 1");
        }
        if self.idempotency.prune_interval_ms == 0 {
            return invalid("idempotency.prune_interval_ms", "must be positive");
        }
        let w = &self.worker;
        if w.concurrency == 0 {
            return invalid("worker.concurrency", "must be at least 1");
        }
        if w.batch_size < 1 {
            return invalid("worker.batch_size", "must be at least 1");
        }
        if w.claim_batch < 1 {
            return invalid("worker.claim_batch", "must be at least 1");
        }
        if w.heartbeat_ms == 0 || w.heartbeat_ms * 2 > w.lease_ms {
            return invalid(
                "worker.heartbeat_ms",
                "must be positive and at most half of worker.lease_ms",
            );
        }
        if w.shutdown_grace_ms == 0 || w.shutdown_grace_ms * 2 > w.lease_ms {
            return invalid(
                "worker.shutdown_grace_ms",
                "must be positive and at most half of worker.lease_ms",
            );
        }
        if w.retention_interval_ms == 0 {
            return invalid("worker.retention_interval_ms", "must be positive");
        }
        if w.vacuum_dead_rows < 0 {
            return invalid("worker.vacuum_dead_rows", "must be 0 (off) or positive");
        }
        if w.vacuum_interval_ms == 0 {
            return invalid("worker.vacuum_interval_ms", "must be positive");
        }
        if w.poll_interval_ms == 0 {
            return invalid("worker.poll_interval_ms", "must be positive");
        }
        if w.rescue_probe_ms == 0 || w.rescue_grace_ms < w.rescue_probe_ms * 2 {
            return invalid(
                "worker.rescue_grace_ms",
                "must be at least twice worker.rescue_probe_ms, which must be positive",
            );
        }
        if w.max_attempts < 1 {
            return invalid("worker.max_attempts", "must be at least 1");
        }
        if w.backoff_base_ms == 0 || w.backoff_max_ms < w.backoff_base_ms {
            return invalid(
                "worker.backoff_max_ms",
                "must be at least worker.backoff_base_ms, which must be positive",
            );
        }
        if w.job_timeout_ms == 0 {
            return invalid("worker.job_timeout_ms", "must be positive");
        }
        if w.timeouts.values().any(|&ms| ms == 0) {
            return invalid("worker.timeouts", "must all be positive");
        }
        if let Some((kind, _)) = w.kinds.iter().find(|(_, k)| k.concurrency < 1) {
            let key = format!("worker.kinds.{kind}.concurrency");
            return invalid(
                &key,
                "must be at least 1 (leave the kind out to cap it only by worker.concurrency)",
            );
        }
        if self.settlement.time_zone.parse::<chrono_tz::Tz>().is_err() {
            return invalid("settlement.time_zone", "is not an IANA time zone name");
        }
        if self.settlement.max_span_days < 1 {
            return invalid("settlement.max_span_days", "must be at least 1");
        }
        if !(1..=64).contains(&self.settlement.parallel_parts) {
            return invalid("settlement.parallel_parts", "must be between 1 and 64");
        }
        if self.schedule.at_time().is_none() {
            return invalid("schedule.at", "must be a time of day, HH:MM or HH:MM:SS");
        }
        let zone = self.schedule.time_zone.as_deref();
        if zone.is_some_and(|zone| zone.parse::<chrono_tz::Tz>().is_err()) {
            return invalid("schedule.time_zone", "is not an IANA time zone name");
        }
        if self.schedule.check_interval_ms == 0 {
            return invalid("schedule.check_interval_ms", "must be positive");
        }
        if self.settlement.max_transactions_per_request == 0 {
            return invalid(
                "settlement.max_transactions_per_request",
                "must be at least 1",
            );
        }
        if self.auth.cache_ttl_ms > 60_000 {
            return invalid("auth.cache_ttl_ms", "must be at most 60000 (one minute)");
        }
        Ok(())
    }
}

/// `SETTLE_SECTION__KEY` variables, plus the conventional unprefixed names.
fn env_layer() -> Figment {
    Figment::new()
        .merge(
            Env::prefixed("SETTLE_")
                .ignore(&["CONFIG", "LOG", "LOG_FORMAT"])
                .split("__"),
        )
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;
    use std::time::Duration;

    /// The error with its causes, as the CLI prints it.
    fn chain(e: ConfigError) -> String {
        format!("{:#}", anyhow::Error::from(e))
    }

    #[test]
    fn defaults_are_valid() {
        Config::from_figment(Config::defaults()).expect("shipped config.toml is valid");
    }

    #[test]
    fn unknown_key_is_named() {
        let figment = Config::defaults().merge(Toml::string("[http]\nprot = 1\n"));
        let err = chain(Config::from_figment(figment).unwrap_err());
        assert!(err.contains("prot"), "{err}");
        // Page sizes moved to [pagination]; the old keys are refused, not ignored.
        let figment = Config::defaults().merge(Toml::string("[orders]\nmax_page_size = 9\n"));
        let err = chain(Config::from_figment(figment).unwrap_err());
        assert!(err.contains("max_page_size"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let figment = Config::defaults().merge(Serialized::default("worker.concurrency", 0));
        let err = chain(Config::from_figment(figment).unwrap_err());
        assert!(err.contains("worker.concurrency"), "{err}");
        let figment = Config::defaults().merge(Serialized::default("http.port", "eighty"));
        let err = chain(Config::from_figment(figment).unwrap_err());
        assert!(err.contains("port"), "{err}");
        for (key, value) in [
            ("worker.shutdown_grace_ms", 5001),
            ("worker.retention_interval_ms", 0),
            ("worker.vacuum_dead_rows", -1),
            ("worker.vacuum_interval_ms", 0),
            ("idempotency.prune_interval_ms", 0),
            ("pagination.default_page_size", 501),
            ("auth.cache_ttl_ms", 60_001),
            ("schedule.check_interval_ms", 0),
        ] {
            let figment = Config::defaults().merge(Serialized::default(key, value));
            let err = chain(Config::from_figment(figment).unwrap_err());
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn schedule_times_and_zones_are_checked() {
        for (key, value) in [
            ("schedule.at", "25:00"),
            ("schedule.at", "noon"),
            ("schedule.time_zone", "Mars/Olympus"),
        ] {
            let figment = Config::defaults().merge(Serialized::default(key, value));
            let err = chain(Config::from_figment(figment).unwrap_err());
            assert!(err.contains(key), "{key}={value}: {err}");
        }
        let figment = Config::defaults().merge(Serialized::default("schedule.at", "23:59:30"));
        let config = Config::from_figment(figment).unwrap();
        assert_eq!(config.schedule.at_time(), "23:59:30".parse().ok());
    }

    #[test]
    fn attempt_timeouts_per_kind_override_the_default() {
        let defaults = Config::from_figment(Config::defaults()).unwrap();
        assert!(defaults.worker.timeouts["settlement"] > defaults.worker.job_timeout_ms);
        let figment = Config::defaults().merge(Serialized::default("worker.timeouts.sleep", 300));
        let config = Config::from_figment(figment).unwrap();
        let settings = crate::worker::settings(&config.worker);
        assert_eq!(
            settings.timeout_for(crate::jobs::kind::SLEEP),
            Duration::from_millis(300)
        );
        assert_eq!(
            settings.timeout_for(crate::jobs::kind::NOOP),
            Duration::from_millis(config.worker.job_timeout_ms)
        );
        let figment = Config::defaults().merge(Serialized::default("worker.timeouts.sleep", 0));
        let err = chain(Config::from_figment(figment).unwrap_err());
        assert!(err.contains("worker.timeouts"), "{err}");
    }

    #[test]
    fn kind_caps_are_read_and_checked() {
        let defaults = Config::from_figment(Config::defaults()).unwrap();
        let settings = crate::worker::settings(&defaults.worker);
        assert!(
            settings.kind_concurrency.is_empty(),
            "no kind is capped by default"
        );
        let figment =
            Config::defaults().merge(Toml::string("[worker.kinds.sleep]\nconcurrency = 3\n"));
        let settings = crate::worker::settings(&Config::from_figment(figment).unwrap().worker);
        assert_eq!(settings.kind_concurrency[crate::jobs::kind::SLEEP], 3);
        assert!(
            !settings
                .kind_concurrency
                .contains_key(crate::jobs::kind::NOOP)
        );
        for bad in ["0", "-1"] {
            let toml = format!("[worker.kinds.sleep]\nconcurrency = {bad}\n");
            let figment = Config::defaults().merge(Toml::string(&toml));
            let err = chain(Config::from_figment(figment).unwrap_err());
            assert!(
                err.contains("`worker.kinds.sleep.concurrency` must be at least 1"),
                "{bad}: {err}"
            );
        }
        let figment =
            Config::defaults().merge(Toml::string("[worker.kinds.sleep]\nconcurency = 3\n"));
        let err = chain(Config::from_figment(figment).unwrap_err());
        assert!(err.contains("concurency"), "{err}");
    }
}
