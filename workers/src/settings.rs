//! The knobs of one worker runtime. The main crate maps its `config::WorkerConfig` into this, so
//! the queue does not depend on how settle loads configuration.

use std::collections::HashMap;
use std::time::Duration;

/// How a [`crate::Worker`] claims, holds and retries jobs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Jobs run at once by this worker (a semaphore bounds it).
    pub concurrency: usize,
    /// Most jobs claimed by one claim statement (never more than free slots).
    pub claim_batch: i64,
    /// A claim stays valid this long after the last heartbeat; then any worker may reclaim it.
    pub lease: Duration,
    /// How often every held lease is extended, in one statement.
    pub heartbeat: Duration,
    /// Fallback poll when no NOTIFY arrives (jobs whose `run_at` comes due, lost notifications).
    pub poll_interval: Duration,
    /// How often this worker probes the other workers' liveness locks (see `crate::liveness`).
    pub rescue_probe: Duration,
    /// How long an owner's lock must be seen free, probe after probe, before its jobs are
    /// rescued: longer than a live worker takes to open a new session and lock again.
    pub rescue_grace: Duration,
    /// First retry delay after a failure; doubles per attempt, plus up to 25 % jitter.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Transient database errors in a row (without the job's checkpoint moving) that one
    /// attempt retries from its last checkpoint without spending the attempt; the next one fails
    /// the attempt like any other error, so a job never retries forever.
    pub max_transient_retries: u32,
    /// How long one attempt may run before it is aborted and fails (spending the attempt),
    /// unless its kind has its own entry in `kind_timeouts`.
    pub job_timeout: Duration,
    /// Per-kind attempt timeouts, overriding `job_timeout`.
    pub kind_timeouts: HashMap<String, Duration>,
    /// Most jobs of a kind this worker runs at once (each at least 1), within `concurrency`;
    /// kinds not listed are bounded by `concurrency` alone (see `crate::caps`).
    pub kind_concurrency: HashMap<String, usize>,
    /// Finished jobs older than this are pruned; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// How often this worker tries to prune (only the holder of the advisory lock does).
    pub retention_interval: Duration,
    /// On shutdown, how long running jobs get to reach a checkpoint before they are stopped.
    pub shutdown_grace: Duration,
    /// Dead rows in `jobs` past which a worker vacuums it (0: never; autovacuum's job alone).
    pub vacuum_dead_rows: i64,
    /// How often this worker reads the dead rows (and vacuums past the threshold).
    pub vacuum_interval: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 256,
            claim_batch: 256,
            lease: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            poll_interval: Duration::from_secs(1),
            rescue_probe: Duration::from_millis(200),
            rescue_grace: Duration::from_millis(1000),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            max_transient_retries: 10,
            job_timeout: Duration::from_secs(3600),
            kind_timeouts: HashMap::new(),
            kind_concurrency: HashMap::new(),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_interval: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            vacuum_dead_rows: 100_000,
            vacuum_interval: Duration::from_secs(2),
        }
    }
}

impl WorkerSettings {
    /// The attempt timeout of jobs of `kind`.
    pub fn timeout_for(&self, kind: &str) -> Duration {
        self.kind_timeouts
            .get(kind)
            .copied()
            .unwrap_or(self.job_timeout)
    }
}
