//! The job body's side: the [`JobContext`] handle it receives, the [`Batch`] transaction that
//! commits the body's own writes together with the new checkpoint and progress (fenced), and
//! the typed [`Outcome`] it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::error::JobError;
use crate::lease::LeaseClock;

/// How an attempt ended, as the body sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the runtime marks it COMPLETED with this result (unless [`Batch::complete`]
    /// already did, together with the body's last writes), or CANCELLED if a cancel was
    /// requested before that write.
    Completed(Option<Value>),
    /// The body chose to stop for good (or saw its token fire): CANCELLED, or released when the
    /// worker is shutting down and no cancel was requested.
    Cancelled,
    /// Run again after this delay, without spending the attempt (a snooze).
    Retry(Duration),
    /// FAILED at once with this error, whatever attempts are left.
    Fatal(String),
}

/// What a body returns; `?` on `sqlx` errors gives [`JobError::Db`].
pub type JobResult = Result<Outcome, JobError>;

/// The handle a job body gets: its input, where the last commit left off, its stop token, and
/// [`JobContext::begin`] to open a fenced batch.
pub struct JobContext {
    pub(crate) id: i64,
    pub(crate) kind: String,
    pub(crate) args: Value,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) fence: i64,
    pub(crate) checkpoint: Option<Value>,
    pub(crate) processed: i64,
    pub(crate) total: Option<i64>,
    pub(crate) pool: PgPool,
    /// The worker's lease: a checkpoint's fenced write extends it as a heartbeat would.
    pub(crate) lease: Duration,
    pub(crate) stop: CancellationToken,
    /// Set once a batch completed the job, so the runtime does not complete it again.
    pub(crate) finished: Arc<AtomicBool>,
    /// Noted at each commit that extends the lease, for the heartbeat's reckoning.
    pub(crate) renewed: Arc<LeaseClock>,
}

impl JobContext {
    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> i32 {
        self.attempt
    }

    pub fn max_attempts(&self) -> i32 {
        self.max_attempts
    }

    /// This claim's fencing token: one higher at every claim of the job, so a kind that fences
    /// its own tables (writes only while its stored fence matches) stops a former holder's
    /// writes the moment the job is claimed again.
    pub fn fence(&self) -> i64 {
        self.fence
    }

    /// The raw args.
    pub fn args_json(&self) -> &Value {
        &self.args
    }

    /// The args parsed as `T`; unparsable args are [`JobError::Fatal`] (retrying cannot help).
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, JobError> {
        serde_json::from_value(self.args.clone())
            .map_err(|e| JobError::Fatal(format!("invalid args for {}: {e}", self.kind)))
    }

    /// The last committed checkpoint parsed as `T`; `None` on a fresh start.
    pub fn checkpoint<T: DeserializeOwned>(&self) -> Result<Option<T>, JobError> {
        self.checkpoint
            .clone()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| JobError::Fatal(format!("unreadable checkpoint: {e}")))
    }

    /// Progress as of the last commit.
    pub fn processed(&self) -> i64 {
        self.processed
    }

    pub fn total(&self) -> Option<i64> {
        self.total
    }

    /// For reads outside a batch.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// True once a cancel was requested or the worker is shutting down: stop at the next
    /// checkpoint (return [`JobError::Stopped`] or [`Outcome::Cancelled`]).
    pub fn is_cancelled(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Whether a cancel was requested, read from the job's row now (the token also fires on
    /// shutdown): a body that stopped tells by it whether to discard its work or keep it for
    /// the next attempt.
    pub async fn cancel_requested(&self) -> Result<bool, sqlx::Error> {
        crate::db::on_conn(&self.pool, async |conn| {
            crate::cancel::requested(conn, self.id).await
        })
        .await
    }

    /// The stop token, to `select!` on while waiting.
    pub fn token(&self) -> &CancellationToken {
        &self.stop
    }

    /// `Err(JobError::Stopped)` once the token fired: `ctx.ensure_running()?` between batches.
    pub fn ensure_running(&self) -> Result<(), JobError> {
        if self.is_cancelled() {
            Err(JobError::Stopped)
        } else {
            Ok(())
        }
    }

    /// Opens a transaction for one batch: do the batch's writes on [`Batch::conn`], then
    /// [`Batch::commit`] them with the new checkpoint, or [`Batch::complete`] the job with them.
    pub async fn begin(&mut self) -> Result<Batch<'_>, JobError> {
        let begun = Instant::now();
        let tx = self.pool.begin().await?;
        Ok(Batch {
            ctx: self,
            tx,
            begun,
        })
    }
}

/// One batch's transaction. Dropping it without commit rolls the batch back.
pub struct Batch<'a> {
    ctx: &'a mut JobContext,
    tx: Transaction<'static, Postgres>,
    /// Before the transaction began: its `now()`, which the commit's lease extension uses, is
    /// no earlier. (Taken before the connection is acquired too, which `Pool::begin` does in
    /// the same call: a slow acquire makes the lease clock older than the lease, never younger.)
    begun: Instant,
}

impl Batch<'_> {
    /// The batch's connection, inside its transaction.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Commits the batch's writes with `checkpoint` and progress in one transaction, fenced.
    /// `Err(LeaseLost)` when another worker owns the job and `Err(Stopped)` when a cancel was
    /// requested; in both cases the batch is rolled back and nothing lands.
    pub async fn commit(
        mut self,
        checkpoint: &impl Serialize,
        processed: i64,
        total: Option<i64>,
    ) -> Result<(), JobError> {
        let checkpoint = serde_json::to_value(checkpoint).map_err(JobError::failed)?;
        // The write extends the lease too: it holds the row locked until its commit, and a
        // body committing back to back would otherwise find the heartbeat (which skips locked
        // rows) missing it beat after beat.
        let cancel: Option<bool> = sqlx::query_scalar!(
            "update jobs set checkpoint = $3, processed = $4, total = coalesce($5, total),
                 lease_expires_at = greatest(lease_expires_at,
                                             now() + $6 * interval '1 millisecond'),
                 heartbeat_at = now()
             where id = $1 and fence = $2 and state::text in ('running', 'cancelling')
             returning cancel_requested",
            self.ctx.id,
            self.ctx.fence,
            checkpoint,
            processed,
            total,
            self.ctx.lease.as_millis() as f64,
        )
        .fetch_optional(&mut *self.tx)
        .await?;
        match cancel {
            None => return Err(JobError::LeaseLost),
            Some(true) => {
                self.ctx.stop.cancel();
                return Err(JobError::Stopped);
            }
            Some(false) => {}
        }
        self.tx.commit().await?;
        self.ctx.renewed.renewed(self.begun);
        self.ctx.checkpoint = Some(checkpoint);
        self.ctx.processed = processed;
        self.ctx.total = total.or(self.ctx.total);
        Ok(())
    }

    /// Records the job's progress in this batch's transaction (fenced), to land with its
    /// commit or completion: for a body that knows its exact `total` only once it has read
    /// its input. `Err(LeaseLost)` when another worker owns the job.
    pub async fn set_progress(&mut self, processed: i64, total: i64) -> Result<(), JobError> {
        let held = sqlx::query!(
            "update jobs set processed = $3, total = $4
             where id = $1 and fence = $2 and state::text in ('running', 'cancelling')",
            self.ctx.id,
            self.ctx.fence,
            processed,
            total,
        )
        .execute(&mut *self.tx)
        .await?;
        if held.rows_affected() == 0 {
            return Err(JobError::LeaseLost);
        }
        self.ctx.processed = processed;
        self.ctx.total = Some(total);
        Ok(())
    }

    /// Commits the batch's writes and marks the job COMPLETED with `result`, in one fenced
    /// transaction: the job's effect and its completion land together or not at all.
    ///
    /// A cancel requested before this commit wins: the batch is rolled back (none of its writes
    /// land), the stop token fires and `Err(Stopped)` is returned, so the body's cancel path
    /// runs and the runtime records CANCELLED. The job's row is locked first, so a cancel
    /// arriving later waits for this commit and is answered that the job finished.
    pub async fn complete(mut self, result: Option<Value>) -> JobResult {
        let (id, fence) = (self.ctx.id, self.ctx.fence);
        match crate::finish::lock_for_completion(&mut self.tx, id, fence).await? {
            None => return Err(JobError::LeaseLost),
            Some(true) => {
                self.ctx.stop.cancel();
                return Err(JobError::Stopped);
            }
            Some(false) => {}
        }
        let Some(ended) = crate::finish::complete(&mut self.tx, id, fence, result.as_ref()).await?
        else {
            return Err(JobError::LeaseLost);
        };
        self.tx.commit().await?;
        ended.record();
        self.ctx.finished.store(true, Ordering::SeqCst);
        Ok(Outcome::Completed(result))
    }
}
