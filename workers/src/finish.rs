//! Ending an attempt: complete, fail (retry with backoff or FAILED), snooze, cancel, or release
//! (on shutdown). Every statement is fenced by `(id, fence)` and the running states, so a
//! holder that lost its lease changes nothing and learns it from the zero row count. Every
//! ending also honours a pending cancel (`cancel_requested`): a job whose cancel was answered
//! `cancelling` ends CANCELLED, whether it was completing, failing, snoozing or being
//! released when the request landed.

use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, PgConnection};

use crate::metrics::Ended;
use crate::settings::WorkerSettings;
use crate::state::JobState;

/// Held jobs' endings in one statement (`$ids` and their `$fences`, locked in id order by
/// [`over_held_jobs`]): each job is either finished, when `$final` holds for its row, or
/// requeued. A finished job's row is deleted from `jobs` and inserted into `finished_jobs` with
/// state `$state`, result `$result`, errors `$errors` and `finished_at = now()`; a requeued one
/// stays with `update jobs set $requeue`. Both release the lease. Returns an [`Ended`] per job
/// still held under its fence. `$final` and the others read the job's columns, and the
/// statement's own parameters from `$3`. Every ending shares this shape, so they cannot drift
/// apart. Without `requeue`, every job finishes (`$final` is true).
///
/// A finished job's `attempt` is at most `max_attempts`: a job is claimed past its last
/// attempt only when its worker was lost on it (by a rescue, or from the queue the probe put it
/// back in), and it then ends as that last attempt (here, or cancelled by `cancel`).
///
/// `$final` is read on `held`, the rows as locked (`cancel_requested`, `attempt`,
/// `max_attempts`), not on `jobs`: a cancel committing while this statement waits for its
/// lock is seen there, where the statement's own snapshot, taken before, would make the
/// delete pass over the row and the requeue's recheck drop it, ending nothing.
macro_rules! end_jobs {
    ($ids:expr, $fences:expr, final: $final:literal, state: $state:literal,
     result: $result:literal, errors: $errors:literal, requeue: $requeue:literal
     $(, $arg:expr)* $(,)?) => {
        over_held_jobs!(query_as!(
            Ended;
            ", ended as (
                 delete from jobs
                 where jobs.id = any(array(select id from held where (" + $final + ")))
                 returning jobs.*
             ), finished as (
                 insert into finished_jobs (id, kind, args, state, priority, attempt,
                     max_attempts, run_at, fence, heartbeat_at, cancel_requested, processed,
                     total, checkpoint, errors, result, created_at, started_at, finished_at)
                 select id, kind, args, " + $state + ", priority,
                        least(attempt, max_attempts), max_attempts, run_at,
                        fence, heartbeat_at, cancel_requested, processed, total, checkpoint,
                        " + $errors + ", " + $result + ", created_at, started_at, now()
                 from ended
                 returning kind, state,
                           extract(epoch from finished_at - started_at)::float8 as seconds
             ), requeued as (
                 update jobs set " + $requeue + ", lease_owner = null, lease_expires_at = null
                 where jobs.id = any(array(select id from held where not (" + $final + ")))
                 returning jobs.kind, jobs.state, null::float8 as seconds
             )
             select kind as \"kind!\", state as \"state!: JobState\", seconds from finished
             union all
             select kind, state, seconds from requeued",
            $ids,
            $fences
            $(, $arg)*
        ))
    };
    ($ids:expr, $fences:expr, state: $state:literal, result: $result:literal
     $(, $arg:expr)* $(,)?) => {
        end_jobs!($ids, $fences, final: "true", state: $state, result: $result,
                  errors: "errors", requeue: "state = jobs.state" $(, $arg)*)
    };
}

/// One held job's ending by [`end_jobs`]: `None` when the fence no longer matches.
macro_rules! end_job {
    ($conn:expr, $id:expr, $fence:expr, $($rest:tt)*) => {
        end_jobs!(&[$id][..], &[$fence][..], $($rest)*).fetch_optional($conn).await
    };
}

/// Marks one held job COMPLETED with `result`, or CANCELLED (without the result) when a cancel
/// was requested: a cancel answered `cancelling` always ends CANCELLED. The cancel request locks
/// the row first, so either it committed before this statement (which then sees the flag) or it
/// waits for this commit and answers that the job finished. False when the fence no longer
/// matches (`None`). For a completion that commits the body's own writes, see
/// [`lock_for_completion`].
pub async fn complete(
    conn: &mut PgConnection,
    id: i64,
    fence: i64,
    result: Option<&Value>,
) -> Result<Option<Ended>, sqlx::Error> {
    end_job!(
        conn,
        id,
        fence,
        state: "case when cancel_requested then 'cancelled'::job_state else 'completed' end",
        result: "case when cancel_requested then null else $3::jsonb end",
        result,
    )
}

/// Locks a held job's row inside the transaction that is about to complete it, and says whether
/// a cancel was requested (`None`: the fence no longer matches). Once locked, no cancel request
/// can land before this transaction ends, so the caller either rolls back (cancel pending) or
/// completes with its writes, and the cancel then answers that the job finished.
pub async fn lock_for_completion(
    conn: &mut PgConnection,
    id: i64,
    fence: i64,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar!(
        "select cancel_requested from jobs
         where id = $1 and fence = $2 and state::text in ('running', 'cancelling')
         for update",
        id,
        fence,
    )
    .fetch_optional(conn)
    .await
}

/// Marks many held jobs COMPLETED without a result in one statement (the worker's completion
/// batcher: one commit for many trivial jobs); those with a pending cancel end CANCELLED, as in
/// [`complete`]. Returns the endings of the jobs that were still held. Rows are
/// locked in id order, as the heartbeat and release lock them, so they never deadlock.
pub async fn complete_many(
    conn: &mut PgConnection,
    held: &[(i64, i64)],
) -> Result<Vec<Ended>, sqlx::Error> {
    let (ids, fences): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    end_jobs!(
        &ids,
        &fences,
        state: "case when cancel_requested then 'cancelled'::job_state else 'completed' end",
        result: "null",
    )
    .fetch_all(conn)
    .await
}

/// Records a failure of this attempt. The job goes back to QUEUED with `run_at` pushed out by
/// `retry_in`, or to FAILED when `fatal` or out of attempts (CANCELLED if a cancel is pending).
/// Returns the new state, `None` when the fence no longer matches.
pub async fn fail(
    conn: &mut PgConnection,
    id: i64,
    fence: i64,
    error: &str,
    retry_in: Duration,
    fatal: bool,
) -> Result<Option<Ended>, sqlx::Error> {
    end_job!(
        conn,
        id,
        fence,
        final: "cancel_requested or $5 or attempt >= max_attempts",
        state: "case when cancel_requested then 'cancelled'::job_state else 'failed' end",
        result: "null",
        errors: "errors || jsonb_build_array(jsonb_build_object(
                     'attempt', least(attempt, max_attempts), 'error', $3::text, 'at', now(),
                     'retry_at', null))",
        requeue: "state = 'queued', run_at = now() + $4 * interval '1 millisecond',
                  errors = errors || jsonb_build_array(jsonb_build_object(
                      'attempt', attempt, 'error', $3::text, 'at', now(),
                      'retry_at', now() + $4 * interval '1 millisecond'))",
        // Postgres text holds no NUL character: the message is kept with each NUL marked.
        error.replace('\0', "\u{FFFD}"),
        retry_in.as_millis() as f64,
        fatal,
    )
}

/// Puts a held job back to QUEUED after `after` without spending its attempt (the job asked to
/// run later). A job whose cancel was requested ends CANCELLED instead: a snooze must not park
/// a cancel until the job is claimed again. `None` when the fence no longer matches.
pub async fn snooze(
    conn: &mut PgConnection,
    id: i64,
    fence: i64,
    after: Duration,
) -> Result<Option<Ended>, sqlx::Error> {
    end_job!(
        conn,
        id,
        fence,
        final: "cancel_requested",
        state: "'cancelled'",
        result: "null",
        errors: "errors",
        requeue: "state = 'queued', attempt = greatest(attempt - 1, 0),
                  run_at = now() + $3 * interval '1 millisecond'",
        after.as_millis() as f64,
    )
}

/// Marks a held job CANCELLED. `None` when the fence no longer matches.
pub async fn cancelled(
    conn: &mut PgConnection,
    id: i64,
    fence: i64,
) -> Result<Option<Ended>, sqlx::Error> {
    end_job!(conn, id, fence, state: "'cancelled'", result: "null")
}

/// Hands held jobs back on shutdown, due at once and with the attempt given back (a shutdown
/// is not the job's failure), and wakes the other workers so one takes them now rather than at
/// lease expiry. A job with a pending cancel ends CANCELLED instead, as at every ending.
/// Returns the jobs still held under their fences.
pub async fn release(
    conn: &mut PgConnection,
    held: &[(i64, i64)],
) -> Result<Vec<Ended>, sqlx::Error> {
    let (ids, fences): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    // One transaction: a NOTIFY that fails takes the release back with it, so a retry finds
    // the jobs still held instead of taking them for lost.
    let mut tx = conn.begin().await?;
    let ended = end_jobs!(&ids, &fences, final: "cancel_requested", state: "'cancelled'",
        result: "null", errors: "errors",
        requeue: "state = 'queued', attempt = greatest(attempt - 1, 0), run_at = now()")
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query!("select pg_notify('settle_jobs', '')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ended)
}

/// The delay before retry number `attempt` (1-based): base · 2^(attempt-1), capped, plus up to
/// 25 % jitter so jobs failing together do not retry together. Strictly grows with the attempt
/// until the cap.
pub fn backoff(settings: &WorkerSettings, attempt: i32) -> Duration {
    let exponent = attempt.clamp(1, 31) as u32 - 1;
    let base = settings.backoff_base.as_millis() as u64;
    let delay = base
        .saturating_mul(1u64 << exponent)
        .min(settings.backoff_max.as_millis() as u64);
    let jitter = rand::random_range(0..=delay / 4);
    Duration::from_millis(delay + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let settings = WorkerSettings {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            ..WorkerSettings::default()
        };
        for _ in 0..100 {
            let (one, two, three) = (
                backoff(&settings, 1),
                backoff(&settings, 2),
                backoff(&settings, 3),
            );
            assert!(one < two && two < three, "{one:?} {two:?} {three:?}");
            assert!(one >= Duration::from_millis(100) && one <= Duration::from_millis(125));
            assert!(backoff(&settings, 30) <= Duration::from_millis(1250));
        }
    }
}
