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
/// which this statement never touches), and of two concurrent retries exactly one wins. A
/// refusal names the state that same statement saw, never one read after it: a CANCELLING job
/// that ends CANCELLED a moment later was refused as CANCELLING, not as the retryable CANCELLED.
pub async fn retry(conn: &mut PgConnection, id: i64) -> Result<RetryOutcome, sqlx::Error> {
    loop {
        let (requeued, state) = requeue(conn, id).await?;
        match state {
            _ if requeued => return Ok(RetryOutcome::Retried),
            None => return Ok(RetryOutcome::NotFound),
            // It was retryable as this statement began, and left finished_jobs before the
            // statement could take it (a concurrent retry won, or the retention pruned it):
            // the next statement sees where it went.
            Some(JobState::Failed | JobState::Cancelled) => {}
            Some(state) => return Ok(RetryOutcome::NotRetryable(state)),
        }
    }
}

/// The reset itself: (true, _) when the job was FAILED or CANCELLED and is now QUEUED, moved
/// back from `finished_jobs` to `jobs` under its id, and the workers were woken (by the insert's
/// trigger, as any enqueue wakes them) to take it now rather than at their next poll; else the
/// job's state as this statement saw it (all its parts read one snapshot), `None` for no job.
/// The fence is kept (it only ever grows), so a former holder stays shut out.
async fn requeue(
    conn: &mut PgConnection,
    id: i64,
) -> Result<(bool, Option<JobState>), sqlx::Error> {
    let row = sqlx::query!(
        r#"with moved as (
             delete from finished_jobs where id = $1 and state in ('failed', 'cancelled')
             returning *
         ), requeued as (
             insert into jobs (id, kind, args, priority, max_attempts, fence, errors, created_at)
             select id, kind, args, priority, max_attempts, fence, errors, created_at from moved
             returning id
         )
         select exists (select 1 from requeued) as "requeued!",
                (select state from all_jobs where id = $1) as "state: JobState""#,
        id,
    )
    .fetch_one(conn)
    .await?;
    Ok((row.requeued, row.state))
}
