//! The completion batcher: jobs that completed without a result are recorded together, one
//! statement and one commit for many jobs, since commits bound the queue's throughput. Until
//! its completion is recorded a job stays held, so the heartbeat keeps its lease.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::{on_conn, retry_until};
use crate::finish;
use crate::metrics::Ended;
use crate::runtime::Shared;

/// Completes trivial jobs in batches until `done`, then flushes what is left.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut completed: mpsc::UnboundedReceiver<(i64, i64)>,
    done: CancellationToken,
) {
    let mut batch = Vec::with_capacity(1024);
    loop {
        let finishing = tokio::select! {
            n = completed.recv_many(&mut batch, 1024) => n == 0,
            () = done.cancelled() => true,
        };
        while let Ok(item) = completed.try_recv() {
            batch.push(item);
        }
        if !batch.is_empty() {
            flush(&shared, &batch).await;
            batch.clear();
        }
        if finishing {
            return;
        }
    }
}

/// Records one batch, retrying transient errors for up to a lease, then forgets its jobs.
async fn flush(shared: &Shared, batch: &[(i64, i64)]) {
    let deadline = Instant::now() + shared.settings.lease;
    let control = &shared.control;
    let completed = retry_until(
        deadline,
        None,
        || {
            on_conn(control, async |conn| {
                finish::complete_many(conn, batch).await
            })
        },
        |e| tracing::warn!(error = %e, "completing jobs failed; retrying"),
    )
    .await;
    match completed {
        Ok(ended) => ended.iter().for_each(Ended::record),
        // The jobs' leases will expire and another worker re-runs them.
        Err(e) => tracing::error!(error = %e, jobs = batch.len(), "cannot record completions"),
    }
    let mut held = shared.held.lock().expect("held map");
    for (id, _) in batch {
        held.remove(id);
    }
}
