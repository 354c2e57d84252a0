//! Adding jobs, inside the caller's transaction: an API write and the job it implies commit
//! together or not at all. The insert trigger wakes sleeping workers at commit.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;

/// A job to enqueue.
#[derive(Debug, Clone, Serialize)]
pub struct NewJob {
    /// Registered kind that will run it.
    pub kind: String,
    /// The kind's input, handed to the body as-is.
    pub args: Value,
    /// Higher runs first among due jobs.
    pub priority: i16,
    /// Attempts before FAILED.
    pub max_attempts: i32,
    /// Not started before this instant; `None` is now.
    pub run_at: Option<DateTime<Utc>>,
}

impl NewJob {
    /// A job of `kind` with `args`, priority 0, 5 attempts, due now.
    pub fn new(kind: impl Into<String>, args: Value) -> Self {
        Self {
            kind: kind.into(),
            args,
            priority: 0,
            max_attempts: 5,
            run_at: None,
        }
    }

    /// Sets the attempts before FAILED.
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets the priority (higher first).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }
}

/// Inserts one job on `conn` (typically the caller's open transaction) and returns its id.
pub async fn enqueue(conn: &mut PgConnection, job: &NewJob) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        "insert into jobs (kind, args, priority, max_attempts, run_at)
         values ($1, $2, $3, $4, coalesce($5, now()))
         returning id",
        job.kind,
        job.args,
        job.priority,
        job.max_attempts,
        job.run_at,
    )
    .fetch_one(conn)
    .await
}

/// Inserts many jobs in one statement on `conn`; returns their ids in input order. One
/// notification wakes the workers however many rows it adds.
pub async fn enqueue_many(
    conn: &mut PgConnection,
    jobs: &[NewJob],
) -> Result<Vec<i64>, sqlx::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar!(
        "insert into jobs (kind, args, priority, max_attempts, run_at)
         select j->>'kind', j->'args', (j->>'priority')::smallint, (j->>'max_attempts')::integer,
                coalesce((j->>'run_at')::timestamptz, now())
         from jsonb_array_elements($1) with ordinality as t(j, n)
         order by n
         returning id",
        json!(jobs),
    )
    .fetch_all(conn)
    .await
}
