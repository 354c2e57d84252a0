//! Cancellation requests. The request sets a flag in the row (QUEUED → CANCELLED at once,
//! RUNNING → CANCELLING) and notifies the workers; the holder's listener fires the job's
//! `CancellationToken`, and the job's next checkpoint re-reads the flag, so a missed
//! notification delays a cancel by one checkpoint (or one heartbeat), never loses it.

use sqlx::{Connection, PgConnection};

use crate::state::JobState;

/// Channel carrying the id of a job whose cancel was requested.
pub const CANCEL_CHANNEL: &str = "settle_job_cancel";

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job is now in this state (CANCELLED, or CANCELLING until its next checkpoint); also
    /// returned, unchanged, for a job cancelled before.
    Accepted(JobState),
    /// The job already ended as COMPLETED or FAILED; nothing changed.
    Finished(JobState),
    /// No such job.
    NotFound,
}

/// Requests cancellation of job `id`, in its own transaction on `conn`.
pub async fn request_cancel(
    conn: &mut PgConnection,
    id: i64,
) -> Result<CancelOutcome, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let Some(state) = lock_state(&mut tx, id).await? else {
        return Ok(CancelOutcome::NotFound);
    };
    let outcome = match state {
        JobState::Queued => {
            mark_requested(&mut tx, id, JobState::Cancelled).await?;
            CancelOutcome::Accepted(JobState::Cancelled)
        }
        JobState::Running => {
            mark_requested(&mut tx, id, JobState::Cancelling).await?;
            notify_cancel(&mut tx, id).await?;
            CancelOutcome::Accepted(JobState::Cancelling)
        }
        JobState::Cancelling | JobState::Cancelled => CancelOutcome::Accepted(state),
        JobState::Completed | JobState::Failed => CancelOutcome::Finished(state),
    };
    tx.commit().await?;
    Ok(outcome)
}

/// The job's state, with its row locked so a concurrent claim or finish is ordered around us.
async fn lock_state(conn: &mut PgConnection, id: i64) -> Result<Option<JobState>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select state as "state: JobState" from jobs where id = $1 for update"#,
        id
    )
    .fetch_optional(conn)
    .await
}

async fn mark_requested(
    conn: &mut PgConnection,
    id: i64,
    state: JobState,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update jobs set cancel_requested = true, state = $2::job_state,
             finished_at = case when $2 = 'cancelled' then now() end
         where id = $1",
        id,
        state as JobState,
    )
    .execute(conn)
    .await?;
    Ok(())
}

async fn notify_cancel(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query!("select pg_notify($1, $2)", CANCEL_CHANNEL, id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether a cancel was requested for job `id` (false for no such job). Read now, so a body that
/// stopped can tell a cancel from a shutdown.
pub(crate) async fn requested(conn: &mut PgConnection, id: i64) -> Result<bool, sqlx::Error> {
    let requested: Option<bool> =
        sqlx::query_scalar!("select cancel_requested from jobs where id = $1", id)
            .fetch_optional(conn)
            .await?;
    Ok(requested.unwrap_or(false))
}
