//! Cancellation requests. The request sets a flag in the row (QUEUED → CANCELLED at once,
//! RUNNING → CANCELLING) and notifies the workers (a job whose lease has expired, its holder
//! gone, is held by no one and ends CANCELLED at once, as a queued one does); the holder's listener fires the job's
//! `CancellationToken`, and the job's next checkpoint re-reads the flag, so a missed
//! notification delays a cancel by one checkpoint (or one heartbeat), never loses it. A
//! CANCELLING job whose holder stops renewing its lease ends CANCELLED once the lease expires,
//! at the next liveness probe of any worker ([`end_expired_cancels`]).

use sqlx::{Connection, PgConnection};

use crate::metrics::Ended;
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
    // A job moves between `jobs` and `finished_jobs` when it ends or is retried; a move that
    // lands between the two reads hides it from both once, never twice in a row.
    for _ in 0..2 {
        let mut tx = conn.begin().await?;
        let outcome = match lock_state(&mut tx, id).await? {
            // Nobody holds it: not claimed yet, or its holder is gone (a dead worker of a kind
            // whose places are all taken waits long for a rescue, and would stay CANCELLING).
            Some((JobState::Queued, _) | (JobState::Running | JobState::Cancelling, true)) => {
                let ended = cancel_unheld(&mut tx, &[id]).await?;
                tx.commit().await?;
                ended.iter().for_each(Ended::record);
                return Ok(CancelOutcome::Accepted(JobState::Cancelled));
            }
            Some((JobState::Running, false)) => {
                mark_cancelling(&mut tx, id).await?;
                notify_cancel(&mut tx, id).await?;
                CancelOutcome::Accepted(JobState::Cancelling)
            }
            Some((state, _)) => CancelOutcome::Accepted(state),
            None => match finished_state(&mut tx, id).await? {
                Some(JobState::Cancelled) => CancelOutcome::Accepted(JobState::Cancelled),
                Some(state) => CancelOutcome::Finished(state),
                None => continue,
            },
        };
        tx.commit().await?;
        return Ok(outcome);
    }
    Ok(CancelOutcome::NotFound)
}

/// A live job's state and whether its lease has expired, with its row locked so a concurrent
/// claim or ending is ordered around us (`None`: no live job has this id, or it ended while we
/// waited for the lock).
async fn lock_state(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<(JobState, bool)>, sqlx::Error> {
    let row = sqlx::query!(
        r#"select state as "state: JobState",
                  coalesce(lease_expires_at < now(), false) as "expired!"
           from jobs where id = $1 for update"#,
        id
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|row| (row.state, row.expired)))
}

/// A finished job's state (`None`: no finished job has this id).
async fn finished_state(conn: &mut PgConnection, id: i64) -> Result<Option<JobState>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select state as "state: JobState" from finished_jobs where id = $1"#,
        id
    )
    .fetch_optional(conn)
    .await
}

/// Every CANCELLING job whose lease expired ends CANCELLED at once, whoever held it: a worker
/// found dead (the probe just expired its leases), or one frozen or cut off past its lease
/// (its liveness lock lives on). A rescue would only run them to their cancel, and with every
/// place of their capped kind taken no claim asks for them, perhaps for hours. Rows another
/// transaction holds locked are skipped, not waited for (a claim or a cancel request ending
/// them, a holder's completion), and left to it or the next call. Returns how many ended.
pub async fn end_expired_cancels(conn: &mut PgConnection) -> Result<usize, sqlx::Error> {
    let mut tx = conn.begin().await?;
    // Locked until the end: an API cancel and a retry committing between this read and the
    // ending would otherwise leave a QUEUED job under the same id for it to end.
    let ids = sqlx::query_scalar!(
        "select id from jobs
         where state = 'cancelling' and lease_expires_at < now()
         order by id
         for update skip locked",
    )
    .fetch_all(&mut *tx)
    .await?;
    let ended = cancel_unheld(&mut tx, &ids).await?;
    tx.commit().await?;
    ended.iter().for_each(Ended::record);
    Ok(ended.len())
}

/// Jobs nobody holds (queued, or their lease expired) end CANCELLED at once: they move to
/// `finished_jobs`, as every ending does (`finish`), and are counted as ended once the caller
/// commits. A former holder still alive finds its fence gone and writes nothing. A job claimed
/// past its last attempt (its worker lost on it, see `finish::end_jobs`) ends as that attempt.
async fn cancel_unheld(conn: &mut PgConnection, ids: &[i64]) -> Result<Vec<Ended>, sqlx::Error> {
    sqlx::query_as!(
        Ended,
        r#"with ended as (
             delete from jobs
             where id = any($1) and (state::text = 'queued' or lease_expires_at < now())
             returning *
         )
         insert into finished_jobs (id, kind, args, state, priority, attempt, max_attempts,
             run_at, fence, heartbeat_at, cancel_requested, processed, total, checkpoint, errors,
             result, created_at, started_at, finished_at)
         select id, kind, args, 'cancelled', priority, least(attempt, max_attempts),
                max_attempts, run_at, fence,
                heartbeat_at, true, processed, total, checkpoint, errors, result, created_at,
                started_at, now()
         from ended
         returning kind, state as "state: JobState",
                   extract(epoch from finished_at - started_at)::float8 as seconds"#,
        ids,
    )
    .fetch_all(conn)
    .await
}

/// A running job is asked to stop: CANCELLING until its holder records the ending.
async fn mark_cancelling(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update jobs set cancel_requested = true, state = 'cancelling'
         where id = $1 and state::text = 'running'",
        id,
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
