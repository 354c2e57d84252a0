//! The `settlement` job kind on the settle-workers queue.
//!
//! 1. In the job's first fenced batch: fix the input ([`plan::start`]) and read the claim's
//!    fence; the commit proves the fence is ours and records `total`.
//! 2. `parallel_parts` tasks take the parts in turn (the large ones first, see
//!    [`plan::start`]), each running [`parts::process_batch`] in its own transaction, which first
//!    locks the job's run row `for share` under that fence ([`parts::lock_run`]): the part's
//!    sums and cursor commit together, and only while this worker holds the job. After each
//!    part batch the job's progress is checkpointed through the queue's fenced batch, which
//!    also re-reads the cancel flag (and fires the parts' token).
//! 3. [`finalize::finalize`] runs in the batch that completes the job, so the `settlements`
//!    replacement, the job's result (its CSV rows) and COMPLETED land together or not at all:
//!    nothing outside that fenced transaction publishes or deletes a result.
//!
//! A cancel (flag + token) stops every part before its next batch; the job's working rows are
//! then discarded, and `settlements` is untouched.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::json;
use settle_workers::{JobContext, JobError, JobResult, Outcome, Registry};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::finalize;
use super::overflow;
use super::parts;
use super::plan::{self, Part, Plan};
use super::replica::{Reads, Replica};
use super::{DateRange, DateRangeInput, Settings, SettleError};
use crate::config::Config;

/// The kind name jobs are enqueued under.
pub const KIND: &str = "settlement";

/// Registers the settlement kind on a worker's registry.
pub fn register(registry: &mut Registry, config: &Config) {
    let reads = Reads::new(&config.database, config.database.max_connections);
    let settings =
        Arc::new(Settings::new(&config.settlement, config.worker.batch_size).with_reads(reads));
    registry.register(KIND, move |ctx| run(ctx, settings.clone()));
}

/// What the queue's checkpoint shows: each part's cursor (the authoritative copy lives in
/// `settlement_parts`, committed with the part's sums).
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    high_water_id: i64,
    parts: Vec<PartCursor>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PartCursor {
    part: i32,
    cursor_id: i64,
    hi_id: i64,
}

impl Checkpoint {
    fn of(high_water_id: i64, parts: &[Part]) -> Self {
        Self {
            high_water_id,
            parts: parts
                .iter()
                .map(|p| PartCursor {
                    part: p.part,
                    cursor_id: p.cursor_id,
                    hi_id: p.hi_id,
                })
                .collect(),
        }
    }
}

/// The job body.
pub async fn run(mut ctx: JobContext, settings: Arc<Settings>) -> JobResult {
    let input: DateRangeInput = ctx.args()?;
    let range = DateRange::parse(&input, i64::MAX)
        .map_err(|e| JobError::Fatal(format!("invalid settlement args: {e}")))?;
    let job_id = ctx.id();
    let outcome = settle(&mut ctx, range, &settings).await;
    // A job stopped by a cancel (not a shutdown) or failed for good forgets its work;
    // `settlements` stays as it was, since only a committed finalize writes it. Not knowing
    // whether a cancel came keeps the work (the sweep below finds it if the job ends).
    let discard = match &outcome {
        Err(JobError::Stopped) | Ok(Outcome::Cancelled) => {
            ctx.cancel_requested().await.unwrap_or(false)
        }
        Err(JobError::Fatal(_)) | Ok(Outcome::Fatal(_)) => true,
        _ => false,
    };
    if discard {
        // Under this claim's fence: a holder that lost its lease meanwhile must not delete the
        // run its successor stored (or resumed, which moves the run to the new fence).
        let discarded = async {
            let mut conn = ctx.pool().acquire().await?;
            finalize::delete_working_rows(&mut conn, job_id, Some(ctx.fence())).await
        };
        // The outcome stands whatever becomes of the discard: a fatal failure retried would
        // only fail again. Rows left are swept by the next settlement's first start
        // (`finalize::delete_abandoned_working_rows`), once this job is no longer live.
        if let Err(e) = discarded.await {
            tracing::warn!(job = job_id, error = %e, "discarding the job's working rows failed");
        }
    }
    outcome
}

async fn settle(ctx: &mut JobContext, range: DateRange, settings: &Settings) -> JobResult {
    let job_id = ctx.id();
    let started = std::time::Instant::now();
    let shown = Shown::of(ctx);
    // Only a first start reads the input's bounds (waiting for inserts in flight, maybe behind a
    // bulk load); a resumed job keeps its stored input and goes straight on. The queue's
    // checkpoint says which: the run is stored in the batch that commits the first checkpoint,
    // and a retried job comes back without one (it starts over: rows an earlier life of the job
    // left are discarded below, and its input is fixed anew).
    let resumed = ctx.checkpoint::<serde_json::Value>()?.is_some()
        && plan::get_run(&mut *ctx.pool().acquire().await?, job_id)
            .await?
            .is_some();
    let high_water = if resumed {
        None
    } else {
        tokio::select! {
            mark = plan::high_water_mark(ctx.pool()) => Some(mark?),
            () = ctx.token().cancelled() => return Err(JobError::Stopped),
        }
    };
    // The run goes to this claim's fence in a fenced batch: if the commit lands, it was ours.
    let fence = ctx.fence();
    let mut batch = ctx.begin().await?;
    if !resumed {
        // A retried job's earlier run, parts and sums (a FAILED job keeps them): none is reused.
        finalize::delete_working_rows(batch.conn(), job_id, None).await?;
        let abandoned = finalize::delete_abandoned_working_rows(batch.conn()).await?;
        if abandoned > 0 {
            tracing::info!(
                abandoned,
                "deleted working rows of settlement jobs no longer running"
            );
        }
    }
    let plan = plan::start(batch.conn(), job_id, range, settings, fence, high_water).await?;
    let checkpoint = Checkpoint::of(plan.run.high_water_id, &plan.parts);
    // Capped as the parts' commits are: rows committed below the high-water mark after the
    // input was fixed (a prepared transaction, a COPY with its own ids) are read and counted
    // past the total where their batch had not yet run (or added by the finalize's correction
    // where it had: migration 0023), and a resumed run's count would break
    // `job_progress_valid` for good.
    let (processed, total) = shown.report(plan.processed().min(plan.run.total), plan.run.total);
    batch.commit(&checkpoint, processed, Some(total)).await?;
    // The batches read on the replica once it has replayed the input just fixed.
    let reads = tokio::select! {
        reads = settings.reads.ready(ctx.pool(), job_id, fence) => reads?,
        () = ctx.token().cancelled() => return Err(JobError::Stopped),
    };
    tracing::info!(
        job = job_id,
        total = plan.run.total,
        high_water_id = plan.run.high_water_id,
        parts = plan.parts.len(),
        replica = reads.is_some(),
        ms = started.elapsed().as_millis() as u64,
        "settlement input fixed"
    );

    let parts = run_parts(ctx, &plan, (fence, shown), settings, reads).await?;
    let plan = Plan { parts, ..plan };
    ctx.ensure_running()?;
    tracing::info!(
        job = job_id,
        ms = started.elapsed().as_millis() as u64,
        "settlement parts done"
    );

    let mut batch = ctx.begin().await?;
    // Rows of the input changed while the run read them: the sums are corrected by the
    // changes, or, where they cannot be (a TRUNCATE) or a newer input holds one of the job's
    // days, the run starts over (see `finalize::finalize`).
    let rows = match finalize::finalize(batch.conn(), &plan).await {
        Ok(rows) => rows,
        Err(SettleError::Revised) => {
            drop(batch);
            return Err(start_over(ctx).await);
        }
        Err(e) => {
            drop(batch);
            return Err(settle_error(ctx.pool(), &plan, None, e).await);
        }
    };
    // What the parts read is the input's exact count: where it was not counted up front (see
    // `input::edges`), the total becomes it with the completion (a bound shown before comes
    // down to it). Not below the count shown, which only a start-over on a smaller input can
    // have been above it.
    let counted = plan.processed().max(shown.processed);
    batch.set_progress(counted, counted).await?;
    // `csv_rows` marks a result stored in Postgres (jobs completed before it was kept as files).
    let result = json!({"download_url": format!("/downloads/{job_id}.csv"), "csv_rows": rows});
    let completed = batch.complete(Some(result)).await;
    tracing::info!(
        job = job_id,
        ms = started.elapsed().as_millis() as u64,
        rows,
        completed = completed.is_ok(),
        "settlement finalized"
    );
    if completed.is_ok()
        && let Err(e) = clean_up(ctx.pool(), settings.revision_retention_hours).await
    {
        tracing::warn!(job = job_id, error = %e, "cleanup after settlement failed");
    }
    completed
}

/// Forgets the run whose input was revised under it in a way its finalize cannot correct
/// ([`SettleError::Revised`]) and has the job run again at once, as after a transient error:
/// with no run stored, it fixes a fresh input. Its progress stays where it was ([`Shown`]).
async fn start_over(ctx: &JobContext) -> JobError {
    let job_id = ctx.id();
    tracing::warn!(job = job_id, "{}", SettleError::Revised);
    let forgotten = async {
        let mut conn = ctx.pool().acquire().await?;
        finalize::delete_working_rows(&mut conn, job_id, Some(ctx.fence())).await
    };
    match forgotten.await {
        Ok(_) => JobError::Resume(SettleError::Revised.to_string()),
        Err(e) => JobError::Db(e),
    }
}

/// The progress the job showed when this run began, which the run shows no less of (SPEC:
/// progress never decreases): a run that started over on a fresh input, after one whose input
/// was revised ([`start_over`]), counts its rows from 0 again, possibly of another total.
#[derive(Debug, Clone, Copy)]
struct Shown {
    processed: i64,
    total: i64,
}

impl Shown {
    fn of(ctx: &JobContext) -> Self {
        let total = ctx.total().unwrap_or(0);
        Self {
            processed: ctx.processed().clamp(0, total),
            total,
        }
    }

    /// `(processed, total)` to report for a run that has read `processed` of its `total`: the
    /// total at least the shown one, and `processed` at least the shown count and the shown
    /// share of that total, at most the total (`job_progress_valid`). Where nothing was shown,
    /// or the run has got further, its own figures.
    fn report(self, processed: i64, total: i64) -> (i64, i64) {
        let total = total.max(self.total);
        let share = if self.total > 0 {
            let (shown, of, scale) = (self.processed as i128, self.total as i128, total as i128);
            ((shown * scale + of - 1) / of) as i64
        } else {
            self.processed
        };
        (processed.max(share).min(total), total)
    }
}

/// The cleanup after a completion (see [`finalize::prune_revisions`] and
/// [`finalize::vacuum_after_replace`]); a failure is only logged, as the job is COMPLETED by
/// then.
async fn clean_up(pool: &PgPool, revision_retention_hours: i64) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    finalize::prune_revisions(&mut conn, revision_retention_hours).await?;
    finalize::vacuum_after_replace(&mut conn).await
}

/// The job's error for `e`: an overflow names the merchant-days whose sums do not fit
/// ([`overflow::describe`]; call it once the transaction that overflowed is rolled back), the
/// others are [`said_if_behind`].
async fn settle_error(pool: &PgPool, plan: &Plan, part: Option<&Part>, e: SettleError) -> JobError {
    match e {
        SettleError::Overflow => JobError::Fatal(overflow::describe(pool, plan).await),
        e => said_if_behind(plan.run.job_id, part, e),
    }
}

/// [`job_error`], logged first where the database was found behind the run: the one error a
/// crash that took committed batches leaves, and the job's failure may name another (a
/// sibling part's reset connection).
fn said_if_behind(job_id: i64, part: Option<&Part>, e: SettleError) -> JobError {
    if matches!(e, SettleError::Behind) {
        tracing::warn!(
            job = job_id,
            part = part.map(|p| p.part),
            cursor = part.map(|p| p.cursor_id),
            "{e}"
        );
    }
    job_error(e)
}

/// Overflow cannot be fixed by retrying (its merchant-days unnamed: see [`settle_error`]);
/// database errors keep their kind (transient ones are retried from the checkpoint), and a
/// database behind the run resumes from what it kept.
fn job_error(e: SettleError) -> JobError {
    match e {
        SettleError::Overflow => JobError::Fatal(e.to_string()),
        SettleError::Behind | SettleError::Revised => JobError::Resume(e.to_string()),
        SettleError::Sql(e) => JobError::Db(e),
    }
}

/// Runs the unfinished parts, `settings.parts` at once, each task taking the next part in
/// order when its own is done; checkpoints the job's progress after each part batch; returns
/// every part as its last batch committed it once all are done, or the first error (after
/// stopping the other parts).
async fn run_parts(
    ctx: &mut JobContext,
    plan: &Plan,
    (fence, shown): (i64, Shown),
    settings: &Settings,
    reads: Option<Replica>,
) -> Result<Vec<Part>, JobError> {
    let stop = ctx.token().child_token();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Part>();
    let unfinished: VecDeque<Part> = plan
        .parts
        .iter()
        .filter(|p| !p.is_done())
        .cloned()
        .collect();
    let runners = unfinished.len().min(settings.parts.max(1) as usize);
    let runner = Arc::new(PartRunner {
        pool: ctx.pool().clone(),
        reads,
        replica_off: AtomicBool::new(false),
        overflowed: AtomicBool::new(false),
        plan: plan.clone(),
        fence,
        batch_size: settings.batch_size,
        stop: stop.clone(),
        done: done_tx,
        next: Mutex::new(unfinished),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..runners {
        tasks.spawn(runner.clone().run());
    }
    drop(runner);
    let mut parts = plan.parts.clone();
    let mut failure = None;
    // Each finished part batch moves the job's progress; the channel closes when all tasks end
    // (each holds the runner, and so the sender, until then).
    while let Some(part) = done_rx.recv().await {
        let slot = part.part as usize;
        parts[slot] = part;
        // Batches that finished meanwhile share this checkpoint.
        while let Ok(part) = done_rx.try_recv() {
            let slot = part.part as usize;
            parts[slot] = part;
        }
        if failure.is_some() {
            continue;
        }
        let processed: i64 = parts.iter().map(|p| p.processed).sum();
        let checkpoint = Checkpoint::of(plan.run.high_water_id, &parts);
        let committed = async {
            let mut batch = ctx.begin().await?;
            parts::set_local_async_commit(batch.conn()).await?;
            let (processed, _) = shown.report(processed.min(plan.run.total), plan.run.total);
            batch.commit(&checkpoint, processed, None).await
        }
        .await;
        if let Err(e) = committed {
            stop.cancel();
            failure = Some(e);
        }
    }
    while let Some(ended) = tasks.join_next().await {
        let ended =
            ended.map_err(|e| JobError::failed(anyhow::anyhow!("settlement part panicked: {e}")));
        // The first error; a part's stop, which another part's failure may have caused and
        // which may be joined before it, gives way to any other.
        if let Err(e) = ended.and_then(|r| r)
            && failure
                .as_ref()
                .is_none_or(|f| matches!(f, JobError::Stopped))
        {
            failure = Some(e);
        }
    }
    failure.map_or(Ok(parts), Err)
}

/// What the tasks running a job's parts share.
struct PartRunner {
    pool: PgPool,
    /// The read replica's pool, where the batches are read.
    reads: Option<Replica>,
    /// Set once a batch failed or timed out on the replica: the rest of the run reads on the
    /// primary.
    replica_off: AtomicBool,
    /// Set by the first part whose batch overflowed, which names the merchant-days.
    overflowed: AtomicBool,
    plan: Plan,
    fence: i64,
    batch_size: i64,
    stop: CancellationToken,
    /// Where each part is reported after each of its batches.
    done: mpsc::UnboundedSender<Part>,
    /// The parts no task has taken yet, in order.
    next: Mutex<VecDeque<Part>>,
}

impl PartRunner {
    /// One task: takes the next part until none is left; a failure (or a panic) stops the
    /// other tasks before their next batch.
    async fn run(self: Arc<Self>) -> Result<(), JobError> {
        let stop_others = self.stop.clone().drop_guard();
        loop {
            // Taken and released at once: never held across an await.
            let next = self
                .next
                .lock()
                .expect("never held across a panic")
                .pop_front();
            let Some(part) = next else {
                stop_others.disarm();
                return Ok(());
            };
            self.run_part(part).await?;
        }
    }

    /// The part's next batch read on the replica, if the run reads there; `None`: read it on
    /// the primary. A replica gone silent holds neither the lease (the heartbeat is the
    /// primary's) nor a cancel: both are bounded here. A batch that fails or times out there
    /// sends it, and the rest of the run, to the primary.
    async fn read_on_replica(&self, part: &Part) -> Result<Option<parts::ReadBatch>, JobError> {
        let Some(replica) = self
            .reads
            .as_ref()
            .filter(|_| !self.replica_off.load(Relaxed))
        else {
            return Ok(None);
        };
        let reading = tokio::time::timeout(replica.batch_limit(), async {
            let Some(mut reader) = replica.begin().await? else {
                return Ok(None);
            };
            let read = parts::read_batch(&mut reader, &self.plan, part, self.batch_size).await;
            reader.commit().await?;
            read.map(Some)
        });
        let failure = tokio::select! {
            read = reading => match read {
                Ok(Ok(read)) => return Ok(read),
                Ok(Err(SettleError::Sql(e))) => e.to_string(),
                Ok(Err(e)) => return Err(self.failed(part, e).await),
                Err(_) => "timed out".to_owned(),
            },
            () = self.stop.cancelled() => return Err(JobError::Stopped),
        };
        tracing::warn!(job = self.plan.run.job_id, error = %failure,
            "a batch failed on the read replica: it and the rest of this run read on the primary");
        self.replica_off.store(true, Relaxed);
        Ok(None)
    }

    /// The job's error for `part`'s failed batch ([`settle_error`]), the other parts stopped
    /// first: an overflow's look reads the job's whole input, and only the first part to
    /// overflow looks (the others stop, giving way to its error).
    async fn failed(&self, part: &Part, e: SettleError) -> JobError {
        self.stop.cancel();
        if matches!(e, SettleError::Overflow) && self.overflowed.swap(true, Relaxed) {
            return JobError::Stopped;
        }
        settle_error(&self.pool, &self.plan, Some(part), e).await
    }

    /// One part's loop: a transaction per batch, fenced by the claim lock, until the part is
    /// done or `stop` fires. With a read replica each batch is read there first, then stored in
    /// the fenced transaction on the primary.
    async fn run_part(&self, mut part: Part) -> Result<(), JobError> {
        let (plan, batch_size) = (&self.plan, self.batch_size);
        while !part.is_done() {
            if self.stop.is_cancelled() {
                return Err(JobError::Stopped);
            }
            let read = self.read_on_replica(&part).await?;
            let mut tx = self.pool.begin().await?;
            // A sibling's failure may have come while this one waited for a connection.
            if self.stop.is_cancelled() {
                return Err(JobError::Stopped);
            }
            if !parts::lock_run(&mut tx, plan.run.job_id, self.fence).await? {
                return Err(JobError::LeaseLost);
            }
            parts::set_local_async_commit(&mut tx).await?;
            let next = match read {
                Some(read) => parts::store_batch(&mut tx, plan, &part, read).await,
                None => parts::process_batch(&mut tx, plan, &part, batch_size).await,
            };
            part = match next {
                Ok(next) => next,
                Err(e) => {
                    drop(tx);
                    return Err(self.failed(&part, e).await);
                }
            };
            tx.commit().await?;
            let _ = self.done.send(part.clone());
        }
        Ok(())
    }
}
