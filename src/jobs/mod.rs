//! settle's own small job kinds, kept for tests and benchmarks: they prove the queue without
//! the settlement domain. A worker registers them only with `worker.test_kinds = true`. Their effects go to two probe tables that [`create_probe_tables`]
//! makes (tests and benchmarks call it; a production database never needs them).
//!
//! - `noop`: completes at once; with `{"record": true}` it writes one `queue_probe_effects` row
//!   in its completing transaction (a primary key catches a second run).
//! - `sleep`: `{"ms": n}`, stopping early when cancelled or shut down (unless
//!   `"ignore_token": true`: a body only the attempt timeout can stop).
//! - `fail`: `{"times": n}` fails its first n attempts, then completes.
//! - `panic`: `{"times": n}` panics in its first n attempts, then completes.
//! - `count`: counts `1..=upto` in checkpointed batches (see [`count`]).
//! - `transient`: every run fails with a transient database error (see [`endings`]).
//! - `stubborn`, `final_step`: cancels landing as a job ends (see [`endings`]).

pub mod count;
pub mod endings;

use std::time::Duration;

use serde::Deserialize;
use settle_workers::{JobContext, JobError, JobResult, Outcome, Registry};
use sqlx::PgPool;

/// The probe kinds' names: each is written here once, for the registry below and for the tests
/// and benchmarks that enqueue them.
pub mod kind {
    /// Completes at once; `{"record": true}` writes an effect row as it completes.
    pub const NOOP: &str = "noop";
    /// Sleeps `{"ms": n}`.
    pub const SLEEP: &str = "sleep";
    /// Fails its first `{"times": n}` attempts.
    pub const FAIL: &str = "fail";
    /// Panics in its first `{"times": n}` attempts.
    pub const PANIC: &str = "panic";
    /// Counts in checkpointed batches.
    pub const COUNT: &str = "count";
    /// Fails with a transient database error, always.
    pub const TRANSIENT: &str = "transient";
    /// Ends as told whether or not a cancel came.
    pub const STUBBORN: &str = "stubborn";
    /// Waits inside its completing batch.
    pub const FINAL_STEP: &str = "final_step";
}

/// The registry of every kind this crate knows; `batch_size` is the default count batch.
pub fn registry(batch_size: i64) -> Registry {
    let mut registry = Registry::new();
    registry
        .register(kind::NOOP, noop)
        .register(kind::SLEEP, sleep)
        .register(kind::FAIL, fail)
        .register(kind::PANIC, panic)
        .register(kind::COUNT, move |ctx| count::run(ctx, batch_size))
        .register(kind::TRANSIENT, endings::transient)
        .register(kind::STUBBORN, endings::stubborn)
        .register(kind::FINAL_STEP, endings::final_step);
    registry
}

/// Creates the tables the probe kinds write their effects to.
pub async fn create_probe_tables(pool: &PgPool) -> Result<(), sqlx::Error> {
    // Unchecked: DDL, several statements in one round trip.
    sqlx::raw_sql(
        "create table if not exists queue_probe_effects (
             job_id bigint primary key,
             attempt integer not null,
             at timestamptz not null default now()
         );
         create table if not exists queue_probe_counts (
             job_id bigint primary key,
             counted bigint not null,
             batches integer not null
         );
         create table if not exists queue_probe_marks (
             job_id bigint primary key,
             at timestamptz not null default now()
         );",
    )
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(Deserialize, Default)]
struct NoopArgs {
    #[serde(default)]
    record: bool,
}

async fn noop(mut ctx: JobContext) -> JobResult {
    let args: NoopArgs = ctx.args()?;
    if !args.record {
        return Ok(Outcome::Completed(None));
    }
    let (id, attempt) = (ctx.id(), ctx.attempt());
    let mut batch = ctx.begin().await?;
    record_effect(batch.conn(), id, attempt).await?;
    batch.complete(None).await
}

/// Writes attempt `attempt` of job `id`'s effect row, in the caller's transaction (a primary key
/// catches a second run).
async fn record_effect(
    conn: &mut sqlx::PgConnection,
    id: i64,
    attempt: i32,
) -> Result<(), sqlx::Error> {
    // Unchecked: the probe tables are made by `create_probe_tables`, not by the migrations the
    // checks run against.
    sqlx::query("insert into queue_probe_effects (job_id, attempt) values ($1, $2)")
        .bind(id)
        .bind(attempt)
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Deserialize)]
struct SleepArgs {
    ms: u64,
    #[serde(default)]
    ignore_token: bool,
}

async fn sleep(ctx: JobContext) -> JobResult {
    let args: SleepArgs = ctx.args()?;
    if args.ignore_token {
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        return Ok(Outcome::Completed(None));
    }
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(args.ms)) => Ok(Outcome::Completed(None)),
        () = ctx.token().cancelled() => Err(JobError::Stopped),
    }
}

#[derive(Deserialize)]
struct TimesArgs {
    times: i32,
}

async fn fail(ctx: JobContext) -> JobResult {
    let args: TimesArgs = ctx.args()?;
    if ctx.attempt() <= args.times {
        return Err(JobError::failed(anyhow::anyhow!(
            "failing on purpose (attempt {} of {} planned failures)",
            ctx.attempt(),
            args.times
        )));
    }
    Ok(Outcome::Completed(Some(
        serde_json::json!({"attempt": ctx.attempt()}),
    )))
}

async fn panic(ctx: JobContext) -> JobResult {
    let args: TimesArgs = ctx.args()?;
    if ctx.attempt() <= args.times {
        panic!("panicking on purpose (attempt {})", ctx.attempt());
    }
    Ok(Outcome::Completed(Some(
        serde_json::json!({"attempt": ctx.attempt()}),
    )))
}
