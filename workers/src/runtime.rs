//! The worker runtime: a plain tokio loop that claims jobs when woken (LISTEN/NOTIFY, polling
//! as the fallback) while a semaphore has free slots, plus the tasks that keep held jobs alive:
//! the heartbeat, the cancel listener, the completion batcher and the retention pruner.
//!
//! Shutdown, step by step:
//! 1. the shutdown token fires: the claim loop stops claiming;
//! 2. every running job's stop token (a child of shutdown) fires; bodies stop at their next
//!    checkpoint, and the runtime releases their leases without spending the attempt;
//! 3. a body still running after `shutdown_grace` is aborted and released the same way;
//! 4. once every slot is back, queued completions are flushed and the heartbeat stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::settings::WorkerSettings;
use crate::{cancel, claim, finish, lease, retention};

/// Channel a worker is woken on when jobs are inserted or released.
pub const JOBS_CHANNEL: &str = "settle_jobs";

/// A job this worker holds, as the background tasks need to see it.
pub(crate) struct Held {
    pub fence: i64,
    /// Given to the body: fired by a cancel request or shutdown.
    pub stop: CancellationToken,
    /// Fired when the lease is gone: the body is aborted and nothing more is written.
    pub lost: CancellationToken,
}

/// State shared by the claim loop, the job tasks and the background tasks.
pub(crate) struct Shared {
    pub pool: PgPool,
    /// A few connections of the runtime's own (claims, heartbeats, completion batches), so jobs
    /// that fill the shared pool with database work never delay a heartbeat into a lost lease.
    pub control: PgPool,
    pub settings: WorkerSettings,
    pub registry: Registry,
    /// The registered kinds: the only ones this worker claims.
    pub kinds: Vec<String>,
    /// This worker's name, stored as `lease_owner`.
    pub owner: String,
    pub held: Mutex<HashMap<i64, Held>>,
    pub wake: Notify,
    /// Signalled whenever a job task ends, freeing room to claim.
    pub job_done: Notify,
    pub shutdown: CancellationToken,
    /// Trivial completions, flushed in batches by [`completer`].
    pub completions: mpsc::UnboundedSender<(i64, i64)>,
}

impl Shared {
    pub fn held_snapshot(&self) -> Vec<(i64, i64)> {
        let held = self.held.lock().expect("held map");
        held.iter().map(|(id, h)| (*id, h.fence)).collect()
    }

    pub fn forget(&self, id: i64) {
        self.held.lock().expect("held map").remove(&id);
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
        let owner = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
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
        let (completions, completed) = mpsc::unbounded_channel();
        let control = PgPoolOptions::new()
            .max_connections(CONTROL_CONNECTIONS)
            .acquire_timeout(self.pool.options().get_acquire_timeout())
            .connect_lazy_with((*self.pool.connect_options()).clone());
        let shared = Arc::new(Shared {
            pool: self.pool,
            control,
            settings: self.settings,
            kinds: self
                .registry
                .kinds()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            registry: self.registry,
            owner: self.owner,
            held: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            job_done: Notify::new(),
            shutdown: shutdown.clone(),
            completions,
        });
        tracing::info!(owner = %shared.owner, kinds = ?shared.registry.kinds(),
            concurrency = shared.settings.concurrency, "worker started");
        let done = CancellationToken::new();
        let background = [
            tokio::spawn(listen(shared.clone())),
            tokio::spawn(heartbeat(shared.clone(), done.clone())),
            tokio::spawn(completer(shared.clone(), completed, done.clone())),
            tokio::spawn(prune(shared.clone())),
        ];
        let concurrency = shared.settings.concurrency;
        let slots = Arc::new(Semaphore::new(concurrency));
        let lanes: Vec<_> = (0..CLAIM_LANES)
            .map(|_| tokio::spawn(claim_loop(shared.clone(), slots.clone())))
            .collect();
        for lane in lanes {
            let _ = lane.await;
        }
        // Every job task holds its slot until it has completed (or queued its completion) or
        // released its job.
        let _ = slots.acquire_many(concurrency as u32).await;
        done.cancel();
        for task in background {
            let _ = task.await;
        }
        shared.control.close().await;
        tracing::info!(owner = %shared.owner, "worker stopped");
    }
}

/// The runtime's own connections: one per claim lane, the heartbeat and the completion batcher.
const CONTROL_CONNECTIONS: u32 = CLAIM_LANES as u32 + 2;

/// Claim loops per worker. With one, every slot freed during a claim's round trip (and commit)
/// waits for it; with two, one claims while the other's jobs run, so short jobs keep the slots
/// busy without a worker holding more jobs than it has slots.
const CLAIM_LANES: usize = 2;

/// How long a claim loop waits for more slots to free before claiming for fewer than its
/// share. Short jobs free them well within it; long jobs do not, and a free slot then waits at
/// most this long to be filled.
const GATHER: Duration = Duration::from_millis(2);

/// Claims only for free slots: a worker never holds a job it cannot start at once, so a job it
/// could not run yet stays claimable by an idle worker. To make one claim statement (one
/// commit) fetch many jobs, a loop waits until its share of the slots is free, or [`GATHER`]
/// has passed. It reserves those slots before claiming; each claimed job takes one into its
/// own task and the unused ones are given back.
async fn claim_loop(shared: Arc<Shared>, slots: Arc<Semaphore>) {
    let settings = &shared.settings;
    let share = (settings.concurrency / CLAIM_LANES).max(1);
    loop {
        if !wait_for_slots(&shared, &slots, share).await {
            return;
        }
        let free = slots.available_permits().min(settings.claim_batch as usize);
        let Ok(mut reserved) = slots.clone().try_acquire_many_owned(free as u32) else {
            continue; // the other lane took them
        };
        let claimed = match shared.control.acquire().await {
            Ok(mut conn) => {
                let kinds = &shared.kinds;
                claim::claim(&mut conn, &shared.owner, free as i64, settings.lease, kinds).await
            }
            Err(e) => Err(e),
        };
        let jobs = match claimed {
            Ok(jobs) => jobs,
            Err(e) => {
                drop(reserved);
                tracing::warn!(error = %e, "claim failed; retrying after the poll interval");
                idle(&shared, settings.poll_interval).await;
                continue;
            }
        };
        // Only an empty claim means the queue is drained: a short one may just have skipped
        // rows another worker was claiming at the same instant.
        let drained = jobs.is_empty();
        for job in jobs {
            let slot = reserved.split(1).expect("a slot reserved per claimed job");
            tokio::spawn(crate::execute::run_job(shared.clone(), job, slot));
        }
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

/// LISTENs for new jobs (wakes the claim loop) and cancel requests (fires the job's token).
async fn listen(shared: Arc<Shared>) {
    let mut listener: Option<PgListener> = None;
    loop {
        if shared.shutdown.is_cancelled() {
            return;
        }
        let Some(active) = listener.as_mut() else {
            match connect_listener(&shared.pool).await {
                Ok(l) => {
                    listener = Some(l);
                    // Notifications may have been missed while disconnected.
                    shared.wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN; polling until reconnected");
                    pause(&shared.shutdown, Duration::from_secs(1)).await;
                }
            }
            continue;
        };
        let received = tokio::select! {
            r = active.try_recv() => r,
            () = shared.shutdown.cancelled() => return,
        };
        match received {
            Ok(Some(n)) if n.channel() == cancel::CANCEL_CHANNEL => {
                if let Ok(id) = n.payload().parse::<i64>()
                    && let Some(held) = shared.held.lock().expect("held map").get(&id)
                {
                    held.stop.cancel();
                }
            }
            Ok(Some(_)) => shared.wake.notify_one(),
            // The connection dropped; sqlx reconnects on the next call.
            Ok(None) => shared.wake.notify_one(),
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed");
                listener = None;
                pause(&shared.shutdown, Duration::from_secs(1)).await;
            }
        }
    }
}

async fn connect_listener(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([JOBS_CHANNEL, cancel::CANCEL_CHANNEL])
        .await?;
    Ok(listener)
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = shutdown.cancelled() => {}
    }
}

/// Extends every held lease each beat, in one statement. A job missing from the answer was
/// reclaimed by another worker: its `lost` token fires. If no beat succeeds for a whole lease,
/// every held job is presumed lost too (another worker may already have it).
async fn heartbeat(shared: Arc<Shared>, done: CancellationToken) {
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
        let beat = tokio::time::timeout(settings.heartbeat * 2, async {
            let mut conn = shared.control.acquire().await?;
            lease::heartbeat(&mut conn, &held, settings.lease).await
        })
        .await;
        match beat {
            Ok(Ok(beats)) => {
                last_ok = Instant::now();
                let alive: HashMap<i64, bool> = beats
                    .into_iter()
                    .map(|b| (b.id, b.cancel_requested))
                    .collect();
                let map = shared.held.lock().expect("held map");
                for (id, fence) in held {
                    let Some(h) = map.get(&id).filter(|h| h.fence == fence) else {
                        continue;
                    };
                    match alive.get(&id) {
                        None => h.lost.cancel(),
                        Some(true) => h.stop.cancel(),
                        Some(false) => {}
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

/// Completes trivial jobs in batches: one statement and one commit for many jobs.
async fn completer(
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

async fn flush(shared: &Shared, batch: &[(i64, i64)]) {
    let deadline = Instant::now() + shared.settings.lease;
    loop {
        let result = match shared.control.acquire().await {
            Ok(mut conn) => finish::complete_many(&mut conn, batch).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => break,
            Err(e) if crate::error::is_transient(&e) && Instant::now() < deadline => {
                tracing::warn!(error = %e, "completing jobs failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                // The jobs' leases will expire and another worker re-runs them.
                tracing::error!(error = %e, jobs = batch.len(), "cannot record completions");
                break;
            }
        }
    }
    let mut held = shared.held.lock().expect("held map");
    for (id, _) in batch {
        held.remove(id);
    }
}

/// Prunes finished jobs past retention now and then; the advisory lock picks one worker.
async fn prune(shared: Arc<Shared>) {
    let Some(retention) = shared.settings.retention else {
        return;
    };
    loop {
        let jitter = Duration::from_millis(rand::random_range(0..1000));
        pause(
            &shared.shutdown,
            shared.settings.retention_interval + jitter,
        )
        .await;
        if shared.shutdown.is_cancelled() {
            return;
        }
        let pruned = match shared.pool.acquire().await {
            Ok(mut conn) => retention::prune(&mut conn, retention).await,
            Err(e) => Err(e),
        };
        match pruned {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "pruned finished jobs past retention"),
            Err(e) => tracing::warn!(error = %e, "pruning failed"),
        }
    }
}
