//! `settle bench queue`: 100,000 no-op jobs drained by real `settle worker` child processes,
//! enqueue-to-start latency on an idle queue, and the same claim-and-complete SQL driven by a
//! bare sqlx loop in the same run, with the ratio.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use settle_workers::{NewJob, claim, finish};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command};

use crate::config::Config;
use crate::jobs::kind;

#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Jobs drained in each throughput phase.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Worker processes (each with the configured `worker.concurrency`).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Jobs enqueued one at a time on an idle queue for the latency phase.
    #[arg(long, default_value_t = 1_000)]
    pub latency_jobs: usize,
    /// Tasks of the bare sqlx loop (each claims `worker.claim_batch` per statement).
    #[arg(long, default_value_t = 4)]
    pub raw_tasks: usize,
    /// Database the benchmark uses (created if missing); never the service's own.
    #[arg(long, default_value = "settle_bench_queue")]
    pub database: String,
}

pub async fn run(args: QueueArgs, config: Config) -> anyhow::Result<()> {
    let config = super::process::bench_config(config, &args.database)?;
    let pool = crate::cli::open(&config, true).await?;
    sqlx::query!("truncate jobs").execute(&pool).await?;
    let w = &config.worker;
    println!(
        "settle bench queue: {} no-op jobs, {} worker processes x concurrency {}, claim_batch {}, database {}",
        args.jobs, args.workers, w.concurrency, w.claim_batch, args.database
    );
    let mut workers = Vec::new();
    for _ in 0..args.workers {
        workers.push(start_worker(&config)?);
    }
    // Let the workers connect and LISTEN before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (latency_p50, latency_p99) = latency_phase(&pool, args.latency_jobs).await?;
    println!(
        "pickup  enqueue-to-start on an idle queue: p50 {latency_p50:.2} ms   p99 {latency_p99:.2} ms   ({} jobs, one at a time)",
        args.latency_jobs
    );

    sqlx::query!("truncate jobs").execute(&pool).await?;
    let started = Instant::now();
    enqueue_all(&pool, args.jobs).await?;
    let enqueued = started.elapsed();
    wait_drained(&pool).await?;
    let workers_rate = args.jobs as f64 / started.elapsed().as_secs_f64();
    println!(
        "workers {workers_rate:>9.0} jobs/s   (enqueue {:.2} s + drain, {:.2} s total)",
        enqueued.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for mut worker in workers {
        stop_worker(&mut worker).await?;
    }

    sqlx::query!("truncate jobs").execute(&pool).await?;
    let raw_rate = raw_phase(&config, &pool, &args).await?;
    println!(
        "raw     {raw_rate:>9.0} jobs/s   (bare sqlx loop: {} tasks, same claim + batched complete SQL)",
        args.raw_tasks
    );
    println!(
        "ratio   workers / raw = {:.2}   (target: >= 15,000 jobs/s, p50 pickup < 5 ms)",
        workers_rate / raw_rate
    );
    Ok(())
}

fn start_worker(config: &Config) -> anyhow::Result<Child> {
    super::process::settle_command(config, "worker", "warn", false)?
        // The no-op jobs drained here are a probe kind, off in a production worker.
        .env("SETTLE_WORKER__TEST_KINDS", "true")
        .spawn()
        .context("starting settle worker")
}

async fn stop_worker(child: &mut Child) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
    }
    tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    Ok(())
}

/// Enqueues `n` no-op jobs in one transaction (bulk statements of 10,000).
async fn enqueue_all(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    let jobs: Vec<NewJob> = (0..n).map(|_| NewJob::new(kind::NOOP, json!({}))).collect();
    let mut tx = pool.begin().await?;
    for chunk in jobs.chunks(10_000) {
        settle_workers::enqueue_many(&mut tx, chunk).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Waits until no job is queued or running.
async fn wait_drained(pool: &PgPool) -> anyhow::Result<()> {
    loop {
        let left = sqlx::query_scalar!(
            r#"select (select count(*) from jobs where state = 'queued')
                    + (select count(*) from jobs where state in ('running', 'cancelling'))
                   as "left!""#,
        )
        .fetch_one(pool)
        .await?;
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Enqueues jobs one at a time, each after the previous one started, and returns the p50 and
/// p99 of `started_at - created_at` in milliseconds (both stamped by Postgres' clock).
async fn latency_phase(pool: &PgPool, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut conn = pool.acquire().await?;
    for _ in 0..n {
        let id = settle_workers::enqueue(&mut conn, &NewJob::new(kind::NOOP, json!({}))).await?;
        loop {
            let started = sqlx::query_scalar!(
                r#"select started_at is not null as "started!" from jobs where id = $1"#,
                id
            )
            .fetch_one(&mut *conn)
            .await?;
            if started {
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let latency = sqlx::query!(
        r#"select percentile_cont(0.5) within group (order by ms) as "p50!",
                  percentile_cont(0.99) within group (order by ms) as "p99!"
           from (select extract(epoch from started_at - created_at) * 1000 as ms from jobs) t"#,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((latency.p50, latency.p99))
}

/// The same claim and completion statements the workers run, from a bare loop.
async fn raw_phase(config: &Config, pool: &PgPool, args: &QueueArgs) -> anyhow::Result<f64> {
    enqueue_all(pool, args.jobs).await?;
    let raw = PgPoolOptions::new()
        .max_connections(args.raw_tasks as u32)
        .connect_with(crate::db::connect_options(&config.database.url)?)
        .await?;
    let (batch, lease) = (
        config.worker.claim_batch,
        Duration::from_millis(config.worker.lease_ms),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..args.raw_tasks {
        let raw = raw.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("raw-{task}");
            let kinds = [kind::NOOP.to_owned()];
            let mut conn = raw.acquire().await?;
            loop {
                let jobs = claim::claim(&mut conn, &owner, batch, lease, &kinds).await?;
                if jobs.is_empty() {
                    return anyhow::Ok(());
                }
                let held: Vec<(i64, i64)> = jobs.iter().map(|j| (j.id, j.fence)).collect();
                finish::complete_many(&mut conn, &held).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(args.jobs as f64 / started.elapsed().as_secs_f64())
}
