//! The knobs of one worker runtime. The main crate maps its `config::WorkerConfig` into this, so
//! the queue does not depend on how settle loads configuration.

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
    /// First retry delay after a failure; doubles per attempt, plus up to 25 % jitter.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Finished jobs older than this are pruned; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// How often this worker tries to prune (only the holder of the advisory lock does).
    pub retention_interval: Duration,
    /// On shutdown, how long running jobs get to reach a checkpoint before they are stopped.
    pub shutdown_grace: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            claim_batch: 100,
            lease: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_interval: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
