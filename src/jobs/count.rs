//! The `count` job: a long job in checkpointed batches, the shape settlement will have.
//!
//! Args `{"upto": n, "batch": b?, "sleep_ms": s?, "hold_ms": h?}`. Each batch counts the rows of
//! `generate_series(next, next + b - 1)` and adds them to the job's `queue_probe_counts` row in
//! the same transaction that moves the checkpoint to the next start, so however often the job
//! is killed and resumed, the final count is exactly `n` and `batches` is exactly ⌈n / b⌉; a
//! batch counted twice or skipped would show in both. The job's result is `{"count": c}`, `c`
//! being what its batches counted (the row's `counted`), not its argument.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use settle_workers::{JobContext, JobError, JobResult, Outcome};

#[derive(Deserialize)]
struct Args {
    upto: i64,
    batch: Option<i64>,
    /// Pause after each batch, to make the job long enough to kill in tests.
    #[serde(default)]
    sleep_ms: u64,
    /// Pause inside each batch's transaction, after its write and before its commit, so a test
    /// can freeze the worker while its session is idle in a transaction holding row locks.
    #[serde(default)]
    hold_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    /// First number not counted yet.
    next: i64,
}

pub async fn run(mut ctx: JobContext, default_batch: i64) -> JobResult {
    let args: Args = ctx.args()?;
    let batch_size = args.batch.unwrap_or(default_batch).max(1);
    let mut next = ctx.checkpoint::<Checkpoint>()?.map_or(1, |c| c.next);
    tracing::info!(
        job = ctx.id(),
        attempt = ctx.attempt(),
        next,
        "count job starting"
    );
    while next <= args.upto {
        ctx.ensure_running()?;
        let last = (next + batch_size - 1).min(args.upto);
        let id = ctx.id();
        let mut batch = ctx.begin().await?;
        let counted = sqlx::query_scalar!(
            r#"select count(*) as "counted!" from generate_series($1::bigint, $2::bigint)"#,
            next,
            last
        )
        .fetch_one(batch.conn())
        .await?;
        // Unchecked: the probe tables are made by `create_probe_tables`, not by the migrations the
        // checks run against.
        sqlx::query(
            "insert into queue_probe_counts (job_id, counted, batches) values ($1, $2, 1)
             on conflict (job_id) do update
             set counted = queue_probe_counts.counted + excluded.counted,
                 batches = queue_probe_counts.batches + 1",
        )
        .bind(id)
        .bind(counted)
        .execute(batch.conn())
        .await?;
        if args.hold_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.hold_ms)).await;
        }
        next = last + 1;
        batch
            .commit(&Checkpoint { next }, last, Some(args.upto))
            .await?;
        if args.sleep_ms > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(args.sleep_ms)) => {}
                () = ctx.token().cancelled() => return Err(JobError::Stopped),
            }
        }
    }
    // What the committed batches counted, over every attempt: `n` only if no batch was
    // counted twice or skipped, which is what the tests check.
    // Unchecked: the probe tables are made by `create_probe_tables`, not by the migrations the
    // checks run against.
    let counted: i64 = sqlx::query_scalar(
        "select coalesce((select counted from queue_probe_counts where job_id = $1), 0)",
    )
    .bind(ctx.id())
    .fetch_one(ctx.pool())
    .await?;
    Ok(Outcome::Completed(Some(
        serde_json::json!({"count": counted}),
    )))
}
