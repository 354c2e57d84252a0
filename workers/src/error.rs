//! How a job body fails, and which database errors are the database's fault (retried from the
//! last checkpoint without spending an attempt, a bounded number of times) rather than the
//! job's.

use std::borrow::Cow;

/// Why a job body returned without an [`crate::Outcome`].
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job's own failure: spends an attempt and is retried with backoff, then FAILED.
    #[error("{0:#}")]
    Failed(anyhow::Error),
    /// A failure retrying cannot fix: FAILED at once, with this error kept.
    #[error("{0}")]
    Fatal(String),
    /// A database error. Transient ones (connection lost, serialization failure, deadlock, …)
    /// re-run the body from the last checkpoint without spending an attempt, up to
    /// `WorkerSettings::max_transient_retries` in a row; past that, and for all others, it
    /// counts as [`JobError::Failed`].
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The body stopped because its stop token fired (cancel requested or worker shutting
    /// down); the runtime finds out which and cancels or releases the job.
    #[error("stopped at a checkpoint")]
    Stopped,
    /// The claim's fence no longer matches: another worker owns the job. Nothing was written.
    #[error("lease lost: another worker owns this job")]
    LeaseLost,
    /// The body found the database behind what it had done (its latest commits, made
    /// asynchronously, lost in a server crash): re-run from what the database kept, as after a
    /// transient error.
    #[error("{0}")]
    Resume(String),
}

impl JobError {
    /// Wraps any error as the job's own failure.
    pub fn failed(e: impl Into<anyhow::Error>) -> Self {
        Self::Failed(e.into())
    }

    /// True when re-running from the last checkpoint may succeed without the job changing.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Resume(_)) || matches!(self, Self::Db(e) if is_transient(e))
    }
}

/// Database errors that say nothing about the job: the connection went away, the server is
/// restarting, or Postgres chose this transaction as a serialization/deadlock victim.
pub fn is_transient(e: &sqlx::Error) -> bool {
    is_session_lost(e)
        || matches!(e, sqlx::Error::PoolTimedOut)
        // 40001 serialization_failure, 40P01 deadlock_detected.
        || sql_state(e).is_some_and(|code| matches!(&*code, "40001" | "40P01"))
}

/// The session is gone or going, whatever the statement was: I/O, TLS or protocol failures, a
/// closed pool, 08* connection exceptions, 57P01-03 admin shutdown / crash shutdown / cannot
/// connect now (pg_terminate_backend, restarts), 25P03 idle_in_transaction_session_timeout.
/// The API's 503 and the queue's transient retry both start from this list.
pub fn is_session_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => sql_state(e).is_some_and(|code| {
            matches!(&*code, "57P01" | "57P02" | "57P03" | "25P03") || code.starts_with("08")
        }),
    }
}

/// The SQLSTATE of a database error; `None` for every other error.
pub fn sql_state(e: &sqlx::Error) -> Option<Cow<'_, str>> {
    match e {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    }
}
