//! The sweeper: after a claim fails, hands back the jobs that claim may have taken. A claim
//! whose reply is lost with its connection may have committed, leaving its jobs RUNNING under
//! this worker's lease, held by no task and kept alive by no heartbeat, until the lease expires
//! and a rescue spends an attempt on a run that never happened (with one attempt left, failing
//! the job unrun). It may even commit after the worker saw it fail: a backend runs its statement
//! to the end with its client gone. So the sweeper looks at once, and again once every claim
//! that failed has surely ended, the claims' connections cutting any statement at
//! [`claim_timeout`]. What it finds goes back as a shutdown hands jobs back: due at once,
//! the attempt given back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::within;
use crate::metrics::Ended;
use crate::runtime::Shared;
use crate::{finish, lease};

/// The longest a claim statement may run (normally milliseconds): a third of the lease, so a
/// claim cut off mid-way has ended well before the leases it may have taken expire.
pub(crate) fn claim_timeout(lease: Duration) -> Duration {
    lease / 3
}

/// Time for a cancelled statement's backend to end it, past [`claim_timeout`].
const MARGIN: Duration = Duration::from_millis(500);

/// How long a claim (or a sweep's look) waits for its reply: the server has cut the statement
/// by then.
pub(crate) fn claim_limit(lease: Duration) -> Duration {
    claim_timeout(lease) + MARGIN
}

/// Notes that a claim failed, starting the sweeper unless it is running already; the runtime
/// awaits it at shutdown (see `finish`).
pub(crate) fn claim_failed(shared: &Arc<Shared>) {
    let mut failed = shared.failed_claim.lock().expect("failed claim");
    let idle = failed.is_none();
    *failed = Some(Instant::now());
    if idle {
        let task = tokio::spawn(run(shared.clone()));
        *shared.sweeper.lock().expect("sweeper") = Some(task);
    }
}

/// Waits for the sweeper, if one runs: at shutdown, once the claim loops have stopped, so the
/// jobs of a claim that failed last are handed back before the worker's connections close.
pub(crate) async fn finish(shared: &Shared) {
    let task = shared.sweeper.lock().expect("sweeper").take();
    if let Some(task) = task {
        let _ = task.await;
    }
}

/// Sweeps until a sweep has looked after every failed claim had surely ended (retrying those
/// that cannot look after the poll interval). At shutdown it waits for that moment, looks once
/// more, and stops.
async fn run(shared: Arc<Shared>) {
    let ended = claim_timeout(shared.settings.lease) + MARGIN;
    loop {
        let failed_at = shared
            .failed_claim
            .lock()
            .expect("failed claim")
            .expect("set while the sweeper runs");
        let looked_at = Instant::now();
        let next = if !sweep(&shared).await {
            looked_at + shared.settings.poll_interval
        } else if looked_at >= failed_at + ended {
            let mut failed = shared.failed_claim.lock().expect("failed claim");
            if *failed == Some(failed_at) {
                *failed = None;
                return;
            }
            continue; // another claim failed since
        } else {
            failed_at + ended
        };
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            () = shared.shutdown.cancelled() => {
                // Once the claim that failed last has surely ended, a last look; again if one
                // failed meanwhile (a claim in flight at the signal, which the look waited for).
                let mut until = failed_at;
                loop {
                    tokio::time::sleep_until((until + ended).into()).await;
                    let last = shared.failed_claim.lock().expect("failed claim").unwrap_or(until);
                    if last > until {
                        until = last;
                        continue;
                    }
                    sweep(&shared).await;
                    let mut failed = shared.failed_claim.lock().expect("failed claim");
                    match *failed {
                        Some(last) if last > until => until = last,
                        _ => {
                            *failed = None;
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Hands back the jobs the database shows this worker holding that no task of it holds, but
/// those whose ending this worker gave up recording (they wait for their lease and a rescue,
/// which spends the attempt their failure may have been). False when it could not look.
async fn sweep(shared: &Shared) -> bool {
    let found = {
        // No claim of the other lane is between its statement and holding its jobs.
        let _alone = shared.claiming.write().await;
        let held = shared.held_snapshot();
        let limit = claim_limit(shared.settings.lease);
        let found = within(&shared.control, limit, async |conn| {
            lease::unheld(conn, &shared.owner, &held).await
        })
        .await;
        found.map(|found| (found, held))
    };
    let found = match found {
        Ok((found, held)) => shared.not_given_up(found, &held),
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for the jobs of a failed claim yet");
            return false;
        }
    };
    if found.is_empty() {
        return true;
    }
    // Fenced: a job rescued since (by any worker) is not handed back.
    let lease = shared.settings.lease;
    match within(&shared.control, lease, async |conn| {
        finish::release(conn, &found).await
    })
    .await
    {
        Ok(released) => {
            tracing::warn!(
                jobs = released.len(),
                "handed back the jobs of a claim whose reply was lost"
            );
            released.iter().for_each(Ended::record);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot hand back the jobs of a failed claim yet");
            false
        }
    }
}
