//! Probe kinds for how attempts end when things go wrong at the end: a transient error that
//! never clears, a cancel the body ignores before it completes or snoozes, and a cancel that
//! lands inside the batch that completes a job.
//!
//! - `transient`: every run counts itself in `queue_probe_counts` (its own commit) and then
//!   fails with SQLSTATE 40001 (serialization_failure), raised by Postgres.
//! - `stubborn`: `{"wait_ms": w, "then": "complete" | "result" | "fail" | "snooze" |
//!   "unstorable" | "fail_with_nul", "after_ms": a?}` waits up to `w` for its stop token and
//!   then, whether or not a cancel came, ends as `then` says: completed without a result (left
//!   to the completion batcher), completed with one (recorded by the runtime), failed, asking to
//!   run again after `a` ms (a snooze), completed with a result Postgres refuses, or failed with
//!   a message Postgres refuses as it stands.
//! - `final_step`: `{"wait": "cancel" | "blocked", "blocker": name?}` writes its
//!   `queue_probe_effects` row in a batch, marks in `queue_probe_marks` (committed apart) that
//!   it is inside that batch, and waits before completing with it: `cancel` until its stop
//!   token fires (the cancel commits before the completion starts); `blocked` with its job row
//!   locked, as a completion holds it, until a session whose `application_name` is `blocker`
//!   waits for that lock (the cancel arrives during the completion). Each wait gives up after a
//!   minute so a broken test cannot hang a worker.

use std::time::Duration;

use serde::Deserialize;
use settle_workers::{JobContext, JobError, JobResult, Outcome};

/// How long a probe waits for the test before going on regardless.
const PATIENCE: Duration = Duration::from_secs(60);

pub async fn transient(ctx: JobContext) -> JobResult {
    // Unchecked: the probe tables are made by `create_probe_tables`, not by the migrations the
    // checks run against.
    sqlx::query(
        "insert into queue_probe_counts (job_id, counted, batches) values ($1, 1, 0)
         on conflict (job_id) do update set counted = queue_probe_counts.counted + 1",
    )
    .bind(ctx.id())
    .execute(ctx.pool())
    .await?;
    sqlx::query!(
        "do $$ begin
             raise exception 'probe serialization failure' using errcode = 'serialization_failure';
         end $$",
    )
    .execute(ctx.pool())
    .await?;
    Err(JobError::Fatal("the probe error was not raised".into()))
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Then {
    Complete,
    Result,
    Fail,
    Snooze,
    /// A result Postgres cannot store (jsonb holds no NUL character).
    Unstorable,
    /// A failure whose message holds a NUL character (text cannot).
    FailWithNul,
}

#[derive(Deserialize)]
struct StubbornArgs {
    wait_ms: u64,
    then: Then,
    #[serde(default)]
    after_ms: u64,
}

pub async fn stubborn(ctx: JobContext) -> JobResult {
    let args: StubbornArgs = ctx.args()?;
    let wait = Duration::from_millis(args.wait_ms);
    let _ = tokio::time::timeout(wait, ctx.token().cancelled()).await;
    Ok(match args.then {
        Then::Complete => Outcome::Completed(None),
        Then::Result => Outcome::Completed(Some(serde_json::json!({"stubborn": true}))),
        Then::Fail => return Err(JobError::failed(anyhow::anyhow!("failing despite a stop"))),
        Then::Snooze => Outcome::Retry(Duration::from_millis(args.after_ms)),
        Then::Unstorable => Outcome::Completed(Some(serde_json::json!({"text": "a\u{0}b"}))),
        Then::FailWithNul => return Err(JobError::failed(anyhow::anyhow!("a\u{0}b"))),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Wait {
    Cancel,
    Blocked,
}

#[derive(Deserialize)]
struct FinalStepArgs {
    wait: Wait,
    #[serde(default)]
    blocker: String,
}

pub async fn final_step(mut ctx: JobContext) -> JobResult {
    let args: FinalStepArgs = ctx.args()?;
    let (id, attempt, pool, token) = (
        ctx.id(),
        ctx.attempt(),
        ctx.pool().clone(),
        ctx.token().clone(),
    );
    let mut batch = ctx.begin().await?;
    super::record_effect(batch.conn(), id, attempt).await?;
    if let Wait::Blocked = args.wait {
        sqlx::query!("select 1 as one from jobs where id = $1 for update", id)
            .fetch_optional(batch.conn())
            .await?;
    }
    // Outside the batch, so the test sees it while the batch is still open. Unchecked, as above.
    sqlx::query("insert into queue_probe_marks (job_id) values ($1)")
        .bind(id)
        .execute(&pool)
        .await?;
    match args.wait {
        Wait::Cancel => {
            let _ = tokio::time::timeout(PATIENCE, token.cancelled()).await;
        }
        Wait::Blocked => {
            let backend = sqlx::query_scalar!(r#"select pg_backend_pid() as "pid!""#)
                .fetch_one(batch.conn())
                .await?;
            wait_until_blocking(&pool, backend, &args.blocker).await?;
        }
    }
    batch
        .complete(Some(serde_json::json!({"final_step": true})))
        .await
}

/// Waits (up to [`PATIENCE`]) until a session named `blocker` waits for a lock `backend` holds.
async fn wait_until_blocking(
    pool: &sqlx::PgPool,
    backend: i32,
    blocker: &str,
) -> Result<(), JobError> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        let blocked = sqlx::query_scalar!(
            r#"select exists (select 1 from pg_stat_activity
                              where application_name = $2 and $1 = any(pg_blocking_pids(pid)))
                   as "blocked!""#,
            backend,
            blocker,
        )
        .fetch_one(pool)
        .await?;
        if blocked {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
