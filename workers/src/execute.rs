//! Running one claimed job: the body in its own task (a panic fails the job, not the worker),
//! transient database errors re-run from the last checkpoint without spending an attempt (a
//! bounded number of times in a row), an attempt running past its kind's timeout aborted and
//! failed, and every ending recorded with a fenced write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::claim::ClaimedJob;
use crate::db::{on_conn, retry_until};
use crate::error::{JobError, sql_state};
use crate::job::{JobContext, Outcome};
use crate::lease::LeaseClock;
use crate::runtime::{Completion, Held, Shared};
use crate::{finish, lease};

/// How long a job whose lease was found lost may take to end on its own before it is dropped:
/// long enough for a body that completed the job in its own batch to get the commit's reply.
const FINISHING_GRACE: Duration = Duration::from_millis(500);

/// How an attempt is recorded.
#[derive(Debug)]
enum Ending {
    Complete(Option<Value>),
    /// Completed without a result: left to the completion batcher.
    CompleteLater,
    Fail {
        error: String,
        fatal: bool,
        retry_in: Duration,
    },
    Snooze(Duration),
    Cancel,
    Release,
    /// Already recorded (by the body's last batch) or no longer ours: write nothing.
    Nothing,
}

/// Starts `job` in the slot it was claimed for: it is in `held` when this returns (so the
/// heartbeat keeps its lease, and the sweeper, after a lost claim reply, knows it as held;
/// see `services::sweeper`), and runs in its own task ([`run_job`]).
pub(crate) fn start(
    shared: &Arc<Shared>,
    job: ClaimedJob,
    claim_sent: Instant,
    slot: OwnedSemaphorePermit,
    place: Option<OwnedSemaphorePermit>,
) {
    let stop = shared.shutdown.child_token();
    let lost = CancellationToken::new();
    if job.cancel_requested {
        stop.cancel();
    }
    let renewed = Arc::new(LeaseClock::new(claim_sent));
    let held = Held {
        fence: job.fence,
        stop: stop.clone(),
        lost: lost.clone(),
        renewed: renewed.clone(),
    };
    // An earlier claim of the job still here lost its lease (this worker rescued it itself):
    // that attempt must stop writing.
    if let Some(earlier) = shared.held.lock().expect("held map").insert(job.id, held) {
        earlier.lost.cancel();
    }
    tokio::spawn(run_job(
        shared.clone(),
        job,
        slot,
        place,
        stop,
        lost,
        renewed,
    ));
}

/// Runs a held `job` to an ending and records it; the slot is freed when this returns (for a
/// trivial completion, once it is queued for the batcher, which takes one of the `concurrency`
/// places of its queue: a full queue keeps the slot taken, so claims cannot run ahead of the
/// completions). A job of a capped kind also holds its kind's `place` (see `crate::caps`),
/// freed only once its ending is written, so it never waits in the batcher.
///
/// The endings that write to the database on the way (`record`, `stopped`, `resume_point`)
/// are awaited boxed: inline, their statements' futures made this one ~10 KB, which tokio
/// copies into place at every spawn, a job each (~1.4 KB boxed; the drain ~7% faster,
/// BENCHMARKS.md "Queue", session 27). The common ending, a completion handed to the batcher,
/// allocates nothing for them.
async fn run_job(
    shared: Arc<Shared>,
    job: ClaimedJob,
    slot: OwnedSemaphorePermit,
    place: Option<OwnedSemaphorePermit>,
    stop: CancellationToken,
    lost: CancellationToken,
    renewed: Arc<LeaseClock>,
) {
    let (id, fence) = (job.id, job.fence);
    // A shutdown that came while the claim was in flight hands the job straight back.
    let ending = if shared.shutdown.is_cancelled() {
        Ending::Release
    } else {
        attempt(&shared, job, &stop, &lost, &renewed).await
    };
    tracing::debug!(job = id, ?ending, "attempt ended");
    let ending = match ending {
        // Its place must stay taken until the database no longer shows the job running.
        Ending::CompleteLater if place.is_some() => Ending::Complete(None),
        ending => ending,
    };
    match ending {
        Ending::CompleteLater => {
            // The batcher forgets the job and frees its place once its completion is recorded;
            // until then the heartbeat keeps its lease.
            let queued = shared
                .completing
                .clone()
                .acquire_owned()
                .await
                .expect("the batcher's places are never closed");
            let _ = shared.completions.send(Completion { id, fence, queued });
        }
        Ending::Nothing => shared.forget(id, fence),
        ending => {
            Box::pin(record(&shared, id, fence, &ending, &lost)).await;
            shared.forget(id, fence);
        }
    }
    drop(slot);
    shared.job_done.notify_one();
    if place.is_some() {
        drop(place);
        // More of its kind may be waiting for the place.
        shared.caps.hint();
        // A claim loop that found the kind full and nothing else to do sleeps until woken.
        shared.wake.notify_one();
    }
}

async fn attempt(
    shared: &Shared,
    job: ClaimedJob,
    stop: &CancellationToken,
    lost: &CancellationToken,
    renewed: &Arc<LeaseClock>,
) -> Ending {
    if job.cancel_requested {
        return Ending::Cancel;
    }
    let Some(handler) = shared.registry.get(&job.kind) else {
        return fatal(format!("no handler registered for job kind {:?}", job.kind));
    };
    if job.attempt > job.max_attempts {
        // Only a job whose worker was lost on its last attempt is claimed past max_attempts
        // (by a rescue, or from the queue the probe put it back in).
        return fatal("lease expired on the last attempt (worker lost)".into());
    }
    let (mut checkpoint, mut processed, mut total) =
        (job.checkpoint.clone(), job.processed, job.total);
    // Transient errors since the checkpoint last moved.
    let mut transient_failures = 0u32;
    let timeout = shared.settings.timeout_for(&job.kind);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::time::Instant::now() >= deadline {
            return timed_out(shared, &job, timeout);
        }
        let finished = Arc::new(AtomicBool::new(false));
        let ctx = JobContext {
            id: job.id,
            kind: job.kind.clone(),
            args: job.args.clone(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            fence: job.fence,
            checkpoint: checkpoint.clone(),
            processed,
            total,
            pool: shared.pool.clone(),
            lease: shared.settings.lease,
            stop: stop.clone(),
            finished: finished.clone(),
            renewed: renewed.clone(),
        };
        let mut body = tokio::spawn(handler(ctx));
        let grace = async {
            stop.cancelled().await;
            shared.shutdown.cancelled().await;
            tokio::time::sleep(shared.settings.shutdown_grace).await;
        };
        let joined = tokio::select! {
            joined = &mut body => joined,
            () = lost.cancelled() => {
                // Every fenced write of the body fails now. One that has just completed the
                // job in its own batch (the heartbeat saw that commit before the body had its
                // reply) ends in a moment: not a lost lease, nothing to give up.
                let ended = tokio::time::timeout(FINISHING_GRACE, &mut body).await;
                if finished.load(Ordering::SeqCst) {
                    // Completed. What the body does after (a settlement's vacuum) keeps its
                    // slot and place until it ends, or a shutdown's grace runs out.
                    if ended.is_err() {
                        let grace = async {
                            shared.shutdown.cancelled().await;
                            tokio::time::sleep(shared.settings.shutdown_grace).await;
                        };
                        tokio::select! {
                            _ = &mut body => {}
                            () = grace => body.abort(),
                        }
                    }
                    return Ending::Nothing;
                }
                body.abort();
                tracing::warn!(job = job.id, "lease lost; dropping the job");
                // Dropped without an ending: if the row is still this worker's (its lease not
                // renewed for a whole lease), the sweeper leaves it to its lease and a rescue.
                shared.give_up(job.id, job.fence);
                return Ending::Nothing;
            }
            () = grace => {
                body.abort();
                tracing::warn!(job = job.id, "job ignored shutdown past the grace period; releasing");
                return Ending::Release;
            }
            // The body may ignore its token (or be stuck in a statement): abort it rather than
            // ask it to stop, and fail the attempt. A stop would read as a shutdown and release
            // the job without spending its attempt.
            () = tokio::time::sleep_until(deadline) => {
                body.abort();
                return timed_out(shared, &job, timeout);
            }
        };
        let result = joined.unwrap_or_else(|e| {
            let message = if e.is_panic() {
                panic_message(e.into_panic())
            } else {
                "job task was aborted".into()
            };
            Err(JobError::Failed(anyhow::anyhow!("job panicked: {message}")))
        });
        return match result {
            Ok(Outcome::Completed(_)) if finished.load(Ordering::SeqCst) => Ending::Nothing,
            Ok(Outcome::Completed(None)) => Ending::CompleteLater,
            Ok(Outcome::Completed(result)) => Ending::Complete(result),
            Ok(Outcome::Retry(after)) => Ending::Snooze(after),
            Ok(Outcome::Fatal(error)) | Err(JobError::Fatal(error)) => fatal(error),
            Ok(Outcome::Cancelled) => Box::pin(stopped(shared, job.id, job.fence, true)).await,
            Err(JobError::Stopped) => Box::pin(stopped(shared, job.id, job.fence, false)).await,
            Err(JobError::LeaseLost) => {
                tracing::warn!(job = job.id, "lease lost at a checkpoint; dropping the job");
                Ending::Nothing
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(job = job.id, error = %e, "transient database error; resuming from the last checkpoint");
                let pause = transient_pause(transient_failures + 1);
                let Some(resume) =
                    Box::pin(resume_point(shared, job.id, job.fence, lost, pause)).await
                else {
                    return Ending::Nothing;
                };
                // A body that commits progress between errors is getting somewhere (its
                // attempt timeout still bounds it); one that does not gets a bounded count.
                let moved = resume.processed != processed || resume.checkpoint != checkpoint;
                transient_failures = if moved { 1 } else { transient_failures + 1 };
                let limit = shared.settings.max_transient_retries;
                if transient_failures > limit {
                    let error =
                        format!("{e} (transient; gave up after {limit} retries without progress)");
                    return failure(shared, &job, error);
                }
                (checkpoint, processed, total) =
                    (resume.checkpoint, resume.processed, resume.total);
                if resume.cancel_requested {
                    stop.cancel();
                }
                continue;
            }
            Err(e) => failure(shared, &job, e.to_string()),
        };
    }
}

/// The attempt failed: spend it and retry after the backoff (FAILED when it was the last).
fn failure(shared: &Shared, job: &ClaimedJob, error: String) -> Ending {
    Ending::Fail {
        error,
        fatal: false,
        retry_in: finish::backoff(&shared.settings, job.attempt),
    }
}

fn timed_out(shared: &Shared, job: &ClaimedJob, timeout: Duration) -> Ending {
    tracing::warn!(job = job.id, kind = %job.kind, ?timeout, "attempt timed out; aborted");
    failure(shared, job, format!("timed out after {timeout:?}"))
}

/// The pause before re-running after the `n`th transient error in a row (from 1): 100 ms,
/// doubling, at most 5 s, so a database restart is waited out without hammering it.
fn transient_pause(n: u32) -> Duration {
    let exponent = n.clamp(1, 7) - 1;
    Duration::from_millis(100u64 << exponent).min(Duration::from_secs(5))
}

/// Re-reads the last committed checkpoint, retrying while the database is unreachable, until
/// the lease is declared lost (`None`: someone else will resume the job).
async fn resume_point(
    shared: &Shared,
    id: i64,
    fence: i64,
    lost: &CancellationToken,
    mut pause: Duration,
) -> Option<lease::Resume> {
    loop {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = lost.cancelled() => return None,
        }
        match reload(shared, id, fence).await {
            Ok(resume) => return resume,
            Err(e) => tracing::warn!(job = id, error = %e, "cannot reload the checkpoint yet"),
        }
        pause = Duration::from_millis(500);
    }
}

/// The job's resume point, read under its fence (`None`: no longer ours).
async fn reload(
    shared: &Shared,
    id: i64,
    fence: i64,
) -> Result<Option<lease::Resume>, sqlx::Error> {
    on_conn(&shared.pool, async |conn| {
        lease::reload(conn, id, fence).await
    })
    .await
}

/// The body stopped: a requested cancel makes it CANCELLED; otherwise the worker is shutting
/// down and releases it. `chose` is true when the body itself returned `Cancelled`.
async fn stopped(shared: &Shared, id: i64, fence: i64, chose: bool) -> Ending {
    match reload(shared, id, fence).await {
        Ok(None) => Ending::Nothing,
        Ok(Some(row)) if row.cancel_requested => Ending::Cancel,
        _ if shared.shutdown.is_cancelled() => Ending::Release,
        _ if chose => Ending::Cancel,
        _ => Ending::Release,
    }
}

/// Writes `ending` under the fence, retrying transient errors for up to a lease: after that
/// the job will have been reclaimed and our write would match nothing anyway.
async fn record(shared: &Shared, id: i64, fence: i64, ending: &Ending, lost: &CancellationToken) {
    let deadline = Instant::now() + shared.settings.lease;
    let pool = &shared.pool;
    let written = retry_until(
        deadline,
        Some(lost),
        || on_conn(pool, async |conn| write(conn, id, fence, ending).await),
        |e| tracing::warn!(job = id, error = %e, "recording the ending failed; retrying"),
    )
    .await;
    match written {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            job = id,
            ?ending,
            "lease lost before the ending was recorded"
        ),
        // The database refuses this ending's data for good (SQLSTATE class 22, data exception:
        // a result jsonb cannot hold, an interval out of range; 54, a program limit such as a
        // jsonb too large): the job fails for good, saying why, instead of running on under
        // an expiring lease and again elsewhere until rescues spend its attempts. Other errors
        // (a cancelled statement, say) say nothing about the ending and leave it to the lease.
        Err(e)
            if refuses_data(&e)
                && !matches!(
                    ending,
                    Ending::Cancel | Ending::Release | Ending::Fail { fatal: true, .. }
                ) =>
        {
            tracing::error!(
                job = id,
                error = %e,
                ?ending,
                "the database refused the job's ending; failing the job"
            );
            let refused = fatal(format!("the database refused the job's ending: {e}"));
            Box::pin(record(shared, id, fence, &refused, lost)).await;
        }
        Err(e) => {
            tracing::error!(job = id, error = %e, "cannot record the job's ending; its lease will expire");
            shared.give_up(id, fence);
        }
    }
}

async fn write(
    conn: &mut sqlx::PgConnection,
    id: i64,
    fence: i64,
    ending: &Ending,
) -> Result<bool, sqlx::Error> {
    let ended = match ending {
        Ending::Complete(result) => finish::complete(conn, id, fence, result.as_ref()).await?,
        Ending::Fail {
            error,
            fatal,
            retry_in,
        } => finish::fail(conn, id, fence, error, *retry_in, *fatal).await?,
        Ending::Snooze(after) => finish::snooze(conn, id, fence, *after).await?,
        Ending::Cancel => finish::cancelled(conn, id, fence).await?,
        Ending::Release => finish::release(conn, &[(id, fence)]).await?.pop(),
        Ending::CompleteLater | Ending::Nothing => return Ok(true),
    };
    // Each statement commits on its own: the ending is recorded once it is written (a retry
    // after a lost reply matches nothing, so it is never counted twice).
    if let Some(ended) = &ended {
        ended.record();
    }
    Ok(ended.is_some())
}

/// A data exception or a program limit: the same statement with the same data fails again.
fn refuses_data(e: &sqlx::Error) -> bool {
    sql_state(e).is_some_and(|code| code.starts_with("22") || code.starts_with("54"))
}

fn fatal(error: String) -> Ending {
    Ending::Fail {
        error,
        fatal: true,
        retry_in: Duration::ZERO,
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
