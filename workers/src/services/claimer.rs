//! The claim loops: the only place jobs enter a worker. Each claims only for free slots, so a
//! worker never holds a job it cannot start at once and a job it could not run yet stays
//! claimable by an idle worker; the claim statement itself ([`crate::claim`]) also rescues
//! expired leases. Each claimed job runs in its own task ([`crate::execute`]). A capped kind
//! ([`crate::caps`]) is claimed only for its free places, reserved the same way as the slots.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::sweeper;
use crate::caps::Reserved;
use crate::claim;
use crate::db::within;
use crate::runtime::Shared;

/// Claim loops per worker. With one, every slot freed during a claim's round trip (and commit)
/// waits for it; with two, one claims while the other's jobs run, so short jobs keep the slots
/// busy without a worker holding more jobs than it has slots.
pub(crate) const LANES: usize = 2;

/// How long a claim loop waits for more slots to free before claiming for fewer than its
/// share. Short jobs free them well within it; long jobs do not, and a free slot then waits at
/// most this long to be filled.
const GATHER: Duration = Duration::from_millis(2);

/// One claim loop, until shutdown. To make one claim statement (one commit) fetch many jobs, a
/// loop waits until its share of the slots is free, or [`GATHER`] has passed. It reserves those
/// slots before claiming; each claimed job takes one into its own task and the unused ones are
/// given back.
/// A claim that fails may have committed (its reply lost with its connection): the
/// [`sweeper`] hands back what it took.
pub(crate) async fn run(shared: Arc<Shared>, slots: Arc<Semaphore>) {
    let settings = &shared.settings;
    let share = (settings.concurrency / LANES).max(1);
    loop {
        if !wait_for_slots(&shared, &slots, share).await {
            return;
        }
        let free = slots.available_permits().min(settings.claim_batch as usize);
        let Ok(mut reserved) = slots.clone().try_acquire_many_owned(free as u32) else {
            continue; // the other lane took them
        };
        // Capped kinds' free places, reserved like the slots; a full kind is not claimed.
        let mut places = shared.caps.reserve();
        let rooms = places.rooms();
        let kinds = claimable(&shared, &places);
        let claiming = shared.claiming.read().await;
        let claimed = if kinds.is_empty() {
            // Every kind is capped, and full or found without due jobs: a job's end, a NOTIFY
            // or the next poll wakes this loop.
            Ok((Instant::now(), Vec::new()))
        } else {
            let owner = &shared.owner;
            let limit = sweeper::claim_limit(settings.lease);
            within(&shared.claims, limit, async |conn| {
                // Once a connection is in hand, before the claim is sent: its leases run out
                // no sooner than a lease after this. Taken before a slow acquire (2.3 s as the
                // server came back), it aged the new leases past their length, and the first
                // failed heartbeat dropped a job claimed a moment before.
                let sent = Instant::now();
                claim::claim(conn, owner, free as i64, settings.lease, &kinds, &rooms)
                    .await
                    .map(|jobs| (sent, jobs))
            })
            .await
        };
        let (sent, jobs) = match claimed {
            Ok(claimed) => claimed,
            Err(e) => {
                drop((reserved, claiming));
                tracing::warn!(error = %e, "claim failed; retrying after the poll interval");
                sweeper::claim_failed(&shared);
                idle(&shared, settings.poll_interval).await;
                continue;
            }
        };
        // Only an empty claim means the queue is drained: a short one may just have skipped
        // rows another worker was claiming at the same instant.
        let drained = jobs.is_empty();
        let rescued: Vec<i64> = jobs
            .iter()
            .filter(|job| job.rescued)
            .map(|job| job.id)
            .collect();
        crate::metrics::rescued(rescued.len());
        if !rescued.is_empty() {
            // The probe's rescues (a dead worker's lock freed) are logged by the rescuer.
            tracing::warn!(jobs = ?rescued, "took over jobs whose lease had expired \
                (their worker froze, was cut off or died, or the server restarted)");
        }
        if !rooms.is_empty() && !jobs.iter().any(|job| shared.caps.caps(&job.kind)) {
            shared.caps.found_none(&places);
        }
        for job in jobs {
            let slot = reserved.split(1).expect("a slot reserved per claimed job");
            let place = places.take(&job.kind);
            crate::execute::start(&shared, job, sent, slot, place);
        }
        drop((places, claiming));
        if reserved.num_permits() > 0 {
            drop(reserved);
            // Slots given back: the other lane may be waiting for them.
            shared.job_done.notify_one();
        }
        if drained {
            idle(&shared, settings.poll_interval).await;
        } else {
            // More may be due: let the other lane claim too if it is idle.
            shared.wake.notify_one();
        }
    }
}

/// The kinds one claim asks for: every uncapped kind this worker runs, plus the capped kinds
/// with a free place. Borrowed when no capped kind has room (always, for a worker without caps).
fn claimable<'a>(shared: &'a Shared, places: &Reserved) -> Cow<'a, [String]> {
    let mut with_room = places.kinds().peekable();
    if with_room.peek().is_none() {
        return Cow::Borrowed(&shared.uncapped);
    }
    Cow::Owned(shared.uncapped.iter().chain(with_room).cloned().collect())
}

/// Waits until a slot is free, then up to [`GATHER`] for `share` of them; false on shutdown.
async fn wait_for_slots(shared: &Shared, slots: &Semaphore, share: usize) -> bool {
    while slots.available_permits() == 0 {
        tokio::select! {
            () = shared.job_done.notified() => {}
            () = shared.shutdown.cancelled() => return false,
        }
    }
    let gathered = tokio::time::sleep(GATHER);
    tokio::pin!(gathered);
    while slots.available_permits() < share {
        tokio::select! {
            () = shared.job_done.notified() => {}
            () = &mut gathered => break,
            () = shared.shutdown.cancelled() => return false,
        }
    }
    !shared.shutdown.is_cancelled()
}

/// Waits for a NOTIFY, the poll interval, or shutdown, whichever comes first.
async fn idle(shared: &Shared, poll: Duration) {
    tokio::select! {
        () = shared.wake.notified() => {}
        () = tokio::time::sleep(poll) => {}
        () = shared.shutdown.cancelled() => {}
    }
}
