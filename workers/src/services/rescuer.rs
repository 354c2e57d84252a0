//! The rescuer: this worker's proof of life, and the probe that finds the workers that died.
//!
//! - [`hold`] keeps this worker's liveness lock ([`crate::liveness`]) on a session of its own,
//!   waiting on that session's socket so a lost session is seen at once and the lock taken again
//!   on a new one. The lock is taken before the first claim and let go only after the last held
//!   job was completed or released.
//! - [`probe`] every `rescue_probe` looks for owners of live leases whose lock is free. One
//!   found without it on every probe for `rescue_grace` is dead (a live worker whose session
//!   dropped takes its lock again well within that): its running jobs go back to the queue
//!   (a claim takes them under a fresh fence) and its cancelling ones end CANCELLED. A worker
//!   never probes itself: it knows it is alive. The probe also ends CANCELLED every cancelling
//!   job whose lease expired, whoever held it: a frozen or cut-off worker keeps its lock, and
//!   while its kind has no free place no claim would take the job.
//!
//! The lease and the fence stay the safety net: a worker that is alive but cut off keeps its
//! lock (its old session lives on in the server until the server notices the lost socket),
//! so its jobs move on at lease expiry, and if it was taken for dead its writes match nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::pause;
use crate::db::on_conn;
use crate::liveness;
use crate::runtime::Shared;

/// Holds this worker's liveness lock until `release`; `locked` is sent once it is first held.
/// The session is the only connection of a pool of its own, so the lock can never be left
/// behind in a pooled session the runtime reuses; closing that pool ends the session.
pub(crate) async fn hold(
    shared: Arc<Shared>,
    release: CancellationToken,
    locked: oneshot::Sender<()>,
) {
    let options = (*shared.pool.connect_options())
        .clone()
        .application_name("settle liveness");
    let sessions = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(
            shared
                .settings
                .rescue_probe
                .max(std::time::Duration::from_secs(1)),
        )
        .connect_lazy_with(options);
    let mut holder = None;
    if relock(&shared, &sessions, &mut holder, &release).await {
        let _ = locked.send(());
        while let Some(session) = holder.as_mut() {
            let lost = tokio::select! {
                received = session.try_recv() => received,
                () = release.cancelled() => break,
            };
            match lost {
                // The session listens on no channel: nothing to receive.
                Ok(Some(_)) => continue,
                Ok(None) => tracing::warn!("liveness session lost; taking the lock again"),
                Err(e) => {
                    tracing::warn!(error = %e, "liveness session failed; taking the lock again");
                    holder = None;
                }
            }
            if !relock(&shared, &sessions, &mut holder, &release).await {
                break;
            }
        }
    }
    drop(holder);
    sessions.close().await;
}

/// (Re)opens the session when needed and takes the lock on it, retrying every probe period
/// until it is held (true) or `until` fires (false).
async fn relock(
    shared: &Shared,
    sessions: &PgPool,
    holder: &mut Option<PgListener>,
    until: &CancellationToken,
) -> bool {
    // One warning per outage, not one per retry.
    let mut warned = false;
    while !until.is_cancelled() {
        let problem = match holder.as_mut() {
            None => match PgListener::connect_with(sessions).await {
                Ok(session) => {
                    *holder = Some(session);
                    continue;
                }
                Err(e) => format!("cannot open the liveness session: {e}"),
            },
            Some(session) => match liveness::lock(session, &shared.owner).await {
                Ok(true) => return true,
                Ok(false) => "liveness lock held by another session (an old one of this worker \
                              the server has not ended yet?)"
                    .to_owned(),
                Err(e) => {
                    *holder = None;
                    format!("cannot take the liveness lock: {e}")
                }
            },
        };
        if !std::mem::replace(&mut warned, true) {
            tracing::warn!(owner = %shared.owner, "{problem}; retrying");
        }
        pause(until, shared.settings.rescue_probe).await;
    }
    false
}

/// Probes every `rescue_probe` until `done`, taking the jobs of owners dead for
/// `rescue_grace` from them.
pub(crate) async fn probe(shared: Arc<Shared>, done: CancellationToken) {
    let settings = &shared.settings;
    // Owners without their lock, and when this worker first saw them so.
    let mut missing: HashMap<String, Instant> = HashMap::new();
    loop {
        pause(&done, settings.rescue_probe).await;
        if done.is_cancelled() {
            return;
        }
        let dead: Vec<String> = missing
            .iter()
            .filter(|(_, since)| since.elapsed() >= settings.rescue_grace)
            .map(|(owner, _)| owner.clone())
            .collect();
        let probed = on_conn(&shared.control, async |conn| {
            liveness::probe(conn, &shared.owner, &dead).await
        })
        .await;
        let found = match probed {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "liveness probe failed");
                continue;
            }
        };
        if found.expired > 0 {
            crate::metrics::rescued(found.requeued as usize);
            tracing::info!(owners = ?dead, jobs = found.expired, requeued = found.requeued,
                "workers gone (their liveness locks are free); their running jobs back in the queue");
        }
        // The dead owners' cancelling jobs (their leases just expired), and those of workers
        // frozen or cut off past their lease, which no claim may ask for while their capped
        // kind is full.
        if found.expired > found.requeued || found.cancels_expired {
            let ended = on_conn(&shared.control, async |conn| {
                crate::cancel::end_expired_cancels(conn).await
            })
            .await;
            match ended {
                Ok(0) => {}
                Ok(jobs) => {
                    tracing::info!(jobs, "cancelling jobs whose lease expired ended cancelled")
                }
                // Left to the next probe, a rescue, or a cancel request, which end them too.
                Err(e) => tracing::warn!(error = %e, "ending expired cancels failed"),
            }
        }
        let now = Instant::now();
        missing.retain(|owner, _| found.unlocked.contains(owner));
        for owner in found.unlocked {
            missing.entry(owner).or_insert(now);
        }
    }
}
