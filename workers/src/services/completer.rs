//! The completion batcher: jobs that completed without a result are recorded together, one
//! statement and one commit for many jobs, since commits bound the queue's throughput. Until
//! its completion is recorded a job stays held (the heartbeat keeps its lease) and keeps its
//! place in the batcher's queue; with `concurrency` places, a batcher that falls behind keeps
//! slots taken, so claims slow down instead of the queue, the batches and the heartbeat's
//! statement growing without bound (measured: unbounded, a drain that outran its batcher built
//! batches of 85,000 jobs whose row locks starved the heartbeat until the leases were lost).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::{on_conn, retry_until};
use crate::finish;
use crate::metrics::Ended;
use crate::runtime::{Completion, Shared, forget_held};

/// Completes trivial jobs in batches, each as many as have queued since the last one, until
/// `done`, then flushes what is left.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut completed: mpsc::UnboundedReceiver<Completion>,
    done: CancellationToken,
) {
    let mut batch = Vec::with_capacity(shared.settings.concurrency);
    loop {
        let finishing = tokio::select! {
            n = completed.recv_many(&mut batch, shared.settings.concurrency) => n == 0,
            () = done.cancelled() => true,
        };
        if finishing {
            while let Ok(completion) = completed.try_recv() {
                batch.push(completion);
            }
        }
        if !batch.is_empty() {
            flush(&shared, &batch).await;
            // Their places are free now, for jobs waiting (in their slots) to queue theirs.
            batch.clear();
        }
        if finishing {
            return;
        }
    }
}

/// Records one batch, retrying transient errors for up to a lease, then forgets its jobs.
async fn flush(shared: &Shared, batch: &[Completion]) {
    let held: Vec<(i64, i64)> = batch.iter().map(|c| (c.id, c.fence)).collect();
    let deadline = Instant::now() + shared.settings.lease;
    let control = &shared.control;
    let completed = retry_until(
        deadline,
        None,
        || {
            on_conn(control, async |conn| {
                finish::complete_many(conn, &held).await
            })
        },
        |e| tracing::warn!(error = %e, "completing jobs failed; retrying"),
    )
    .await;
    match completed {
        Ok(ended) => ended.iter().for_each(Ended::record),
        // The jobs' leases will expire and another worker re-runs them.
        Err(e) => {
            tracing::error!(error = %e, jobs = batch.len(), "cannot record completions");
            for completion in batch {
                shared.give_up(completion.id, completion.fence);
            }
        }
    }
    let mut held_jobs = shared.held.lock().expect("held map");
    for completion in batch {
        forget_held(&mut held_jobs, completion.id, completion.fence);
    }
}
