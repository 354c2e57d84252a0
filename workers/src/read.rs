//! Reading jobs: one job and keyset pages newest first filtered by state and kind (for the API),
//! and which of some jobs are still live (for kinds that clean up after jobs that no longer are).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::state::JobState;

/// A job as stored, for display.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRecord {
    pub id: i64,
    pub kind: String,
    pub state: JobState,
    pub args: Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub processed: i64,
    pub total: Option<i64>,
    pub result: Option<Value>,
    /// Not claimed before this instant (a retry's backoff).
    pub run_at: DateTime<Utc>,
    /// The worker holding the job's lease (`lease_owner`); `None` unless running or cancelling.
    pub worker: Option<String>,
    /// Every failed attempt, oldest first, across retries.
    pub errors: Json<Vec<AttemptError>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl JobRecord {
    /// The most recent failure's message, if any attempt failed.
    pub fn last_error(&self) -> Option<&str> {
        self.errors.last().map(|e| e.error.as_str())
    }

    /// 0–100: 100 once completed, else processed / total (0 while the total is unknown). Never
    /// goes down, since `processed` only moves with committed checkpoints.
    pub fn progress(&self) -> u8 {
        match (self.state, self.total) {
            (JobState::Completed, _) => 100,
            (_, Some(total)) if total > 0 => ((self.processed.min(total) * 100) / total) as u8,
            _ => 0,
        }
    }
}

/// One failed attempt, as `finish::fail` appends it to the job's `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// The attempt's number (from 1; a retried job counts again from 1).
    pub attempt: i32,
    pub error: String,
    /// When the attempt failed.
    pub at: DateTime<Utc>,
    /// When the next attempt was due; `None` when this failure ended the job.
    #[serde(default)]
    pub retry_at: Option<DateTime<Utc>>,
}

/// Filters of a job listing.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub kind: Option<String>,
    /// Only jobs with an id below this (the previous page's last id).
    pub before: Option<i64>,
    pub limit: i64,
}

/// `select` a job's columns `from all_jobs` (live and finished jobs) and then `$rest`, as
/// [`JobRecord`]s: the checked macros take only literals, so the one column list is spliced
/// into each statement here. A view's columns may all be null as far as sqlx can tell, hence
/// the `!` on those the tables declare `not null`.
macro_rules! select_jobs {
    ($rest:literal, $($arg:expr),* $(,)?) => {
        sqlx::query_as!(
            JobRecord,
            r#"select id as "id!", kind as "kind!", state as "state!: JobState", args as "args!",
                   attempt as "attempt!", max_attempts as "max_attempts!",
                   processed as "processed!", total, result, run_at as "run_at!",
                   lease_owner as worker, errors as "errors!: Json<Vec<AttemptError>>",
                   created_at as "created_at!", started_at, finished_at
               from all_jobs "# + $rest,
            $($arg),*
        )
    };
}

/// One job, or `None`.
pub async fn get_job(conn: &mut PgConnection, id: i64) -> Result<Option<JobRecord>, sqlx::Error> {
    select_jobs!("where id = $1", id).fetch_optional(conn).await
}

/// Up to `filter.limit` jobs, newest first.
pub async fn list_jobs(
    conn: &mut PgConnection,
    filter: &JobFilter,
) -> Result<Vec<JobRecord>, sqlx::Error> {
    select_jobs!(
        "where ($1::job_state is null or state = $1::job_state)
           and ($2::text is null or kind = $2)
           and ($3::bigint is null or id < $3)
         order by id desc
         limit $4",
        filter.state as Option<JobState>,
        filter.kind.as_deref(),
        filter.before,
        filter.limit,
    )
    .fetch_all(conn)
    .await
}

/// Which of `ids` are still live (queued, running or cancelling), in no particular order; a
/// job that ended, or was pruned, is not.
pub async fn live_jobs(conn: &mut PgConnection, ids: &[i64]) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar!(
        "select id from jobs
         where id = any($1) and state in ('queued', 'running', 'cancelling')",
        ids,
    )
    .fetch_all(conn)
    .await
}
