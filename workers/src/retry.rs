//! Retrying a job that ended badly: a FAILED or CANCELLED job goes back to QUEUED with a fresh
//! attempt budget, and starts over. The queue forgets what the earlier attempts left in the
//! row (checkpoint, progress, result, cancel flag, lease), so the kind's body meets the job as
//! on its first start (`JobContext::checkpoint` is `None`) and fixes its input anew; a kind that
//! keeps per-job rows of its own discards them when it starts without a checkpoint. The error
//! history stays: the retried job's new failures are appended after the old ones.

use sqlx::PgConnection;

use crate::state::JobState;

/// What a retry request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The job is QUEUED again, due now.
    Retried,
    /// The job is in this state, which is not FAILED or CANCELLED; nothing changed.
    NotRetryable(JobState),
    /// No such job.
    NotFound,
}

/// Requeues job `id` if it is FAILED or CANCELLED. The state test and the reset are one
/// statement: a concurrent cancel or claim cannot slip in between (both only act on live jobs,
/// which this statement never touches), and of two concurrent retries exactly one wins.
pub async fn retry(conn: &mut PgConnection, id: i64) -> Result<RetryOutcome, sqlx::Error> {
    if requeue(conn, id).await? {
        return Ok(RetryOutcome::Retried);
    }
    // Only for the answer: the state as it is now (the job may be moving on).
    let state = sqlx::query_scalar!(
        r#"select state as "state!: JobState" from all_jobs where id = $1"#,
        id
    )
    .fetch_optional(conn)
    .await?;
    Ok(state.map_or(RetryOutcome::NotFound, RetryOutcome::NotRetryable))
}

/// The reset itself: true when the job was FAILED or CANCELLED and is now QUEUED, moved back
/// from `finished_jobs` to `jobs` under its id, and the workers were woken (by the insert's
/// trigger, as any enqueue wakes them) to take it now rather than at their next poll. The fence
/// is kept (it only ever grows), so a former holder stays shut out.
async fn requeue(conn: &mut PgConnection, id: i64) -> Result<bool, sqlx::Error> {
    let requeued = sqlx::query!(
        "with moved as (
             delete from finished_jobs where id = $1 and state in ('failed', 'cancelled')
             returning *
         )
         insert into jobs (id, kind, args, priority, max_attempts, fence, errors, created_at)
         select id, kind, args, priority, max_attempts, fence, errors, created_at from moved",
        id,
    )
    .execute(conn)
    .await?;
    Ok(requeued.rows_affected() == 1)
}
