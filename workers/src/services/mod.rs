//! The worker's services: the tasks that run beside its jobs, one per file, each owning one
//! concern of the runtime (as River keeps its rescuer and cleaner apart). All of them read the
//! worker's [`Shared`](crate::runtime::Shared) state; [`crate::runtime`] starts and stops them.
//!
//! - [`claimer`]: claims due jobs (and expired leases) for free slots and starts their tasks.
//! - [`listener`]: LISTEN/NOTIFY: wakes the claimer, fires a cancelled job's stop token.
//! - [`heartbeat`]: extends every held lease; drops the jobs whose lease was lost.
//! - [`completer`]: records trivial completions in batches, one commit for many jobs.
//! - [`pruner`]: deletes finished jobs past retention.
//! - [`vacuumer`]: vacuums the jobs table when its dead rows pile up.
//! - [`rescuer`]: holds this worker's liveness lock; hands dead workers' jobs on in seconds.
//! - [`sweeper`]: after a failed claim, hands back the jobs it may have taken unheard.

pub(crate) mod claimer;
pub(crate) mod completer;
pub(crate) mod heartbeat;
pub(crate) mod listener;
pub(crate) mod pruner;
pub(crate) mod rescuer;
pub(crate) mod sweeper;
pub(crate) mod vacuumer;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Sleeps for `duration`, or until `shutdown` fires.
async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = shutdown.cancelled() => {}
    }
}
