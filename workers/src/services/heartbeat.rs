//! The heartbeat: keeps every held job's lease in the future, so a live job is never rescued,
//! and is how this worker learns that a job was taken from it (the job is missing from the
//! answer: its lease expired while the worker stalled, and another worker reclaimed it). It is
//! also the fallback that delivers a cancel whose NOTIFY was missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::db::on_conn;
use crate::lease;
use crate::runtime::{Held, Shared};

/// Extends every held lease each beat, in one statement, until `done`. A job missing from the
/// answer was reclaimed by another worker: its `lost` token fires. A held job whose lease this
/// worker cannot have extended for a whole lease (no beat got through and no checkpoint of its
/// own committed, see [`lease::LeaseClock`]) is presumed lost too: another worker may already
/// have it.
pub(crate) async fn run(shared: Arc<Shared>, done: CancellationToken) {
    let settings = &shared.settings;
    loop {
        tokio::select! {
            () = tokio::time::sleep(settings.heartbeat) => {}
            () = done.cancelled() => return,
        }
        let held = shared.held_snapshot();
        if held.is_empty() {
            continue;
        }
        let beat = tokio::time::timeout(
            settings.heartbeat * 2,
            on_conn(&shared.control, async |conn| {
                // Once a connection is in hand (a slow acquire is no time the leases ran).
                let sent = Instant::now();
                let beats = lease::heartbeat(conn, &held, settings.lease).await?;
                Ok((sent, beats))
            }),
        )
        .await;
        match beat {
            Ok(Ok((sent, beats))) => {
                let alive: HashMap<i64, lease::Beat> =
                    beats.into_iter().map(|b| (b.id, b)).collect();
                let map = shared.held.lock().expect("held map");
                for (id, fence) in held {
                    let Some(h) = map.get(&id).filter(|h| h.fence == fence) else {
                        continue;
                    };
                    match alive.get(&id) {
                        None => h.lost.cancel(),
                        Some(beat) if beat.cancel_requested => {
                            h.renewed.renewed(sent);
                            h.stop.cancel();
                        }
                        // Busy: still ours; its lease is extended by the body's own fenced
                        // write that holds the row (a checkpoint extends it too), or by the
                        // next beat that finds it unlocked (past the lease, it is lost as any
                        // stalled job is).
                        Some(beat) if beat.busy => {}
                        Some(_) => h.renewed.renewed(sent),
                    }
                }
            }
            failed => {
                tracing::warn!(result = ?failed.err(), "heartbeat failed");
                let map = shared.held.lock().expect("held map");
                let ran_out: Vec<&Held> = map
                    .values()
                    .filter(|h| !h.lost.is_cancelled() && h.renewed.ran_out(settings.lease))
                    .collect();
                if !ran_out.is_empty() {
                    tracing::warn!(
                        jobs = ran_out.len(),
                        "no heartbeat for a whole lease; dropping the jobs whose lease ran out"
                    );
                    for h in ran_out {
                        h.lost.cancel();
                    }
                }
            }
        }
    }
}
