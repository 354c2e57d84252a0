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
use crate::runtime::Shared;

/// Extends every held lease each beat, in one statement, until `done`. A job missing from the
/// answer was reclaimed by another worker: its `lost` token fires. If no beat succeeds for a
/// whole lease, every held job is presumed lost too (another worker may already have it).
pub(crate) async fn run(shared: Arc<Shared>, done: CancellationToken) {
    let settings = &shared.settings;
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(settings.heartbeat) => {}
            () = done.cancelled() => return,
        }
        let held = shared.held_snapshot();
        if held.is_empty() {
            last_ok = Instant::now();
            continue;
        }
        let beat = tokio::time::timeout(
            settings.heartbeat * 2,
            on_conn(&shared.control, async |conn| {
                lease::heartbeat(conn, &held, settings.lease).await
            }),
        )
        .await;
        match beat {
            Ok(Ok(beats)) => {
                last_ok = Instant::now();
                let alive: HashMap<i64, lease::Beat> =
                    beats.into_iter().map(|b| (b.id, b)).collect();
                let map = shared.held.lock().expect("held map");
                for (id, fence) in held {
                    let Some(h) = map.get(&id).filter(|h| h.fence == fence) else {
                        continue;
                    };
                    match alive.get(&id) {
                        None => h.lost.cancel(),
                        Some(beat) if beat.cancel_requested => h.stop.cancel(),
                        // Busy: still ours; its lease is extended by the body's own fenced
                        // write that holds the row (a checkpoint extends it too), or by the
                        // next beat that finds it unlocked (past the lease, it is lost as any
                        // stalled job is).
                        Some(_) => {}
                    }
                }
            }
            failed => {
                tracing::warn!(result = ?failed.err(), "heartbeat failed");
                if last_ok.elapsed() >= settings.lease {
                    tracing::warn!("no heartbeat for a whole lease; dropping every held job");
                    for h in shared.held.lock().expect("held map").values() {
                        h.lost.cancel();
                    }
                }
            }
        }
    }
}
