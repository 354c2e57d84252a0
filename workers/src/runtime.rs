//! The worker runtime: the [`Worker`] a binary runs, and the `Shared` state its tasks see. A
//! plain tokio loop: claim loops take jobs when woken (LISTEN/NOTIFY, polling as the fallback)
//! while a semaphore has free slots, each job runs in its own task (`execute`), and the
//! `services` keep held jobs alive beside them: the listener, the heartbeat, the completion
//! batcher, the retention pruner, the vacuumer, the rescuer (this worker's liveness lock, and
//! the probe that hands a dead worker's jobs on), and, after a failed claim, the sweeper.
//!
//! Shutdown, step by step:
//! 1. the shutdown token fires: the claim loops stop claiming (a claim already in flight hands
//!    its jobs straight back), and the listener, the pruner and the vacuumer (mid-vacuum too)
//!    return;
//! 2. every running job's stop token (a child of shutdown) fires; bodies stop at their next
//!    checkpoint, and the runtime releases their leases without spending the attempt;
//! 3. a body still running after `shutdown_grace` is aborted and released the same way;
//! 4. once every slot is back (each job task holds its slot until its ending is recorded or
//!    queued for the batcher) and a sweeper still running has handed back the jobs of the
//!    last failed claim (waiting until that claim has surely ended), the `done` token fires:
//!    the completion batcher flushes what is queued and returns, and the heartbeat, which kept
//!    those jobs' leases until then, stops;
//! 5. the liveness lock is let go (its session closes), then the runtime's own connections.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::{Notify, OwnedSemaphorePermit, RwLock, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::caps::Caps;
use crate::lease::LeaseClock;
use crate::registry::Registry;
use crate::services::{
    claimer, completer, heartbeat, listener, pruner, rescuer, sweeper, vacuumer,
};
use crate::settings::WorkerSettings;

/// Channel a worker is woken on when jobs are inserted or released.
pub const JOBS_CHANNEL: &str = "settle_jobs";

/// A job this worker holds, as the background tasks need to see it.
pub(crate) struct Held {
    pub fence: i64,
    /// Given to the body: fired by a cancel request or shutdown.
    pub stop: CancellationToken,
    /// Fired when the lease is gone: the body is aborted and nothing more is written.
    pub lost: CancellationToken,
    /// When its lease was last extended, as far as this worker knows.
    pub renewed: Arc<LeaseClock>,
}

/// Removes job `id` from `held` if it is held under `fence`.
pub(crate) fn forget_held(held: &mut HashMap<i64, Held>, id: i64, fence: i64) {
    if held.get(&id).is_some_and(|h| h.fence == fence) {
        held.remove(&id);
    }
}

/// A job that completed without a result, waiting for the completion batcher: its id, its
/// fence, and its place in the batcher's queue, held until its completion is recorded.
pub(crate) struct Completion {
    pub id: i64,
    pub fence: i64,
    #[expect(
        dead_code,
        reason = "held for its drop: the place frees once the batch is recorded"
    )]
    pub queued: OwnedSemaphorePermit,
}

/// State shared by the claim loop, the job tasks and the background tasks.
pub(crate) struct Shared {
    pub pool: PgPool,
    /// A few connections of the runtime's own (heartbeats, completion batches, the liveness
    /// probe, the sweeper), so jobs that fill the shared pool with database work never delay a
    /// heartbeat into a lost lease.
    pub control: PgPool,
    /// The claim loops' connections, one per lane: as `control`, and a claim statement is cut
    /// at [`sweeper::claim_timeout`] (see the sweeper).
    pub claims: PgPool,
    pub settings: WorkerSettings,
    pub registry: Registry,
    /// The registered kinds without a cap: claimed whenever slots are free. With the capped
    /// kinds that have room, the only ones this worker claims.
    pub uncapped: Vec<String>,
    /// The capped registered kinds and their free places.
    pub caps: Caps,
    /// This worker's name, stored as `lease_owner`; its liveness lock is keyed by it.
    pub owner: String,
    pub held: Mutex<HashMap<i64, Held>>,
    /// Taken shared by each claim from its statement until its jobs are in `held`, and alone
    /// by the sweep after a claim whose reply was lost (see the sweeper), so the sweep never
    /// takes another lane's jobs, claimed but not yet held, for orphans.
    pub claiming: RwLock<()>,
    /// When the last claim failed, while the [`sweeper`] runs.
    pub failed_claim: Mutex<Option<Instant>>,
    /// The sweeper's task, awaited at shutdown.
    pub sweeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Jobs whose ending this worker gave up recording, forgotten since: the sweeper leaves
    /// them to their lease (pruned to those it still finds).
    pub given_up: Mutex<HashSet<(i64, i64)>>,
    pub wake: Notify,
    /// Signalled whenever a job task ends, freeing room to claim.
    pub job_done: Notify,
    pub shutdown: CancellationToken,
    /// Trivial completions, flushed in batches by the [`completer`].
    pub completions: mpsc::UnboundedSender<Completion>,
    /// Places in the completion batcher's queue (`concurrency` of them): a job waits for one,
    /// keeping its slot, so the queue, the batches and the held jobs stay bounded when the
    /// batcher falls behind.
    pub completing: Arc<Semaphore>,
}

impl Shared {
    pub fn held_snapshot(&self) -> Vec<(i64, i64)> {
        let held = self.held.lock().expect("held map");
        held.iter().map(|(id, h)| (*id, h.fence)).collect()
    }

    /// Notes that the ending of job `id` under `fence` could not be recorded (see `given_up`).
    pub fn give_up(&self, id: i64, fence: i64) {
        self.given_up.lock().expect("given up").insert((id, fence));
    }

    /// `found` (jobs held in the database but by no task, `held` at the look) without those
    /// given up, which stay noted while found or held then (one given up and forgotten while
    /// the look ran is found by the next).
    pub fn not_given_up(&self, mut found: Vec<(i64, i64)>, held: &[(i64, i64)]) -> Vec<(i64, i64)> {
        let mut given_up = self.given_up.lock().expect("given up");
        given_up.retain(|job| found.contains(job) || held.contains(job));
        found.retain(|job| !given_up.contains(job));
        found
    }

    /// Forgets job `id` as held under `fence`; a newer claim of it (this worker's own rescue of
    /// a lease that ran out while the old attempt was still ending) stays held.
    pub fn forget(&self, id: i64, fence: i64) {
        forget_held(&mut self.held.lock().expect("held map"), id, fence);
    }
}

/// A worker: claims and runs jobs of the registered kinds until shutdown.
pub struct Worker {
    pool: PgPool,
    settings: WorkerSettings,
    registry: Registry,
    owner: String,
}

impl Worker {
    pub fn new(pool: PgPool, settings: WorkerSettings, registry: Registry) -> Self {
        let owner = format!(
            "{}-{:08x}{}",
            std::process::id(),
            rand::random::<u32>(),
            crate::liveness::LOCKED_OWNER_SUFFIX
        );
        Self {
            pool,
            settings,
            registry,
            owner,
        }
    }

    /// The `lease_owner` this worker writes.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Runs until `shutdown` fires and every held job is completed or released.
    pub async fn run(self, shutdown: CancellationToken) {
        crate::metrics::rescued(0);
        let (completions, completed) = mpsc::unbounded_channel();
        let control = PgPoolOptions::new()
            .max_connections(CONTROL_CONNECTIONS)
            .acquire_timeout(self.pool.options().get_acquire_timeout())
            .connect_lazy_with(
                control_options(&self.pool.connect_options()).application_name("settle control"),
            );
        let claim_timeout = sweeper::claim_timeout(self.settings.lease)
            .as_millis()
            .max(1);
        let claims = PgPoolOptions::new()
            .max_connections(claimer::LANES as u32)
            .acquire_timeout(self.pool.options().get_acquire_timeout())
            .connect_lazy_with(
                control_options(&self.pool.connect_options())
                    .application_name("settle claims")
                    .options([("statement_timeout", claim_timeout.to_string())]),
            );
        let kinds: Vec<String> = self
            .registry
            .kinds()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let caps = Caps::new(
            &self.settings.kind_concurrency,
            &kinds,
            self.settings.poll_interval,
        );
        let completing = Arc::new(Semaphore::new(self.settings.concurrency));
        let uncapped = kinds.into_iter().filter(|kind| !caps.caps(kind)).collect();
        let shared = Arc::new(Shared {
            pool: self.pool,
            control,
            claims,
            settings: self.settings,
            uncapped,
            caps,
            registry: self.registry,
            owner: self.owner,
            held: Mutex::new(HashMap::new()),
            claiming: RwLock::new(()),
            failed_claim: Mutex::new(None),
            sweeper: Mutex::new(None),
            given_up: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            job_done: Notify::new(),
            shutdown: shutdown.clone(),
            completions,
            completing,
        });
        tracing::info!(owner = %shared.owner, kinds = ?shared.registry.kinds(),
            concurrency = shared.settings.concurrency,
            caps = ?shared.settings.kind_concurrency, "worker started");
        // The liveness lock is held before the first claim and until every held job has ended
        // or been released (after `done`), so no job of this worker ever looks orphaned.
        let release = CancellationToken::new();
        let (locked, first_lock) = oneshot::channel();
        let holder = tokio::spawn(rescuer::hold(shared.clone(), release.clone(), locked));
        tokio::select! {
            _ = first_lock => {}
            () = shutdown.cancelled() => {}
        }
        let done = CancellationToken::new();
        let background = [
            tokio::spawn(rescuer::probe(shared.clone(), done.clone())),
            tokio::spawn(listener::run(shared.clone())),
            tokio::spawn(heartbeat::run(shared.clone(), done.clone())),
            tokio::spawn(completer::run(shared.clone(), completed, done.clone())),
            tokio::spawn(pruner::run(shared.clone())),
            tokio::spawn(vacuumer::run(shared.clone())),
        ];
        let concurrency = shared.settings.concurrency;
        let slots = Arc::new(Semaphore::new(concurrency));
        let lanes: Vec<_> = (0..claimer::LANES)
            .map(|_| tokio::spawn(claimer::run(shared.clone(), slots.clone())))
            .collect();
        for lane in lanes {
            let _ = lane.await;
        }
        // Every job task holds its slot until it has completed (or queued its completion) or
        // released its job.
        let _ = slots.acquire_many(concurrency as u32).await;
        sweeper::finish(&shared).await;
        done.cancel();
        for task in background {
            let _ = task.await;
        }
        release.cancel();
        let _ = holder.await;
        shared.claims.close().await;
        shared.control.close().await;
        tracing::info!(owner = %shared.owner, "worker stopped");
    }
}

/// The runtime's own connections besides the claims': the heartbeat, the completion batcher
/// and the liveness probe (the sweeper, rarely, shares them). The liveness lock has a session
/// of its own besides. In `pg_stat_activity` they are `settle control`, the claims' `settle
/// claims` and the lock's `settle liveness`; the jobs' own connections are the pool's (`settle`).
const CONTROL_CONNECTIONS: u32 = 3;

/// The runtime's own connections' options: `options` with bitmap and sequential scans off (a
/// cost penalty, so a statement with no other path still runs). The planner picks their plans
/// from the statistics of `jobs`, whose contents swing between empty and a deep backlog: where
/// they predict about one row (not analyzed since the backlog came, or analyzed while it was
/// drained), a bitmap scan of the claimable index plus a sort looks cheapest for the claim, and
/// every claim then read and sorted the whole backlog to take its batch (measured in the deep
/// bench: claims of 100-240 ms, drains at 4-7k jobs/s instead of 20-25k); a sequential scan
/// would look as cheap for the held jobs' ids (see `over_held_jobs`). Every statement of the
/// runtime finds its rows through an index (the claimable one in its order, the primary key,
/// the lease expiry), whatever the estimate.
pub fn control_options(options: &PgConnectOptions) -> PgConnectOptions {
    options
        .clone()
        .options([("enable_bitmapscan", "off"), ("enable_seqscan", "off")])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(fence: i64) -> Held {
        Held {
            fence,
            stop: CancellationToken::new(),
            lost: CancellationToken::new(),
            renewed: Arc::new(LeaseClock::new(Instant::now())),
        }
    }

    #[test]
    fn an_older_claims_ending_leaves_a_newer_claim_held() {
        let mut map = HashMap::from([(7, held(2))]);
        forget_held(&mut map, 7, 1);
        assert_eq!(map.get(&7).map(|h| h.fence), Some(2));
        forget_held(&mut map, 7, 2);
        assert!(map.is_empty());
    }
}
