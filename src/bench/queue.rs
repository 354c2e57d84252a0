//! `settle bench queue`: 100,000 no-op jobs drained by real `settle worker` child processes and
//! enqueue-to-start latency on an idle queue, beside two baselines measured in the same run:
//! graphile-worker in its documented high-throughput configuration (`bench/graphile/`) and an
//! independent pgbench claim-and-complete loop (`bench/queue-*.sql`), with the ratios.
//! settle and graphile alternate for `--rounds` rounds and the median of the rounds' ratios is
//! the figure (one run moves by ±10 % here). `--deep` measures instead how the claim rate holds
//! up with a deep queue (`queue_deep`).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use settle_workers::NewJob;
use sqlx::PgPool;
use tokio::process::{Child, Command};

use super::process::Setup;
use crate::jobs::kind;

#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Jobs drained in each throughput phase.
    #[arg(long, default_value_t = 100_000, value_parser = super::at_least_one)]
    pub jobs: usize,
    /// Worker processes (each with the configured `worker.concurrency`).
    #[arg(long, default_value_t = 2, value_parser = super::at_least_one)]
    pub workers: usize,
    /// Rounds of settle then graphile; the printed ratio is the median of the rounds'.
    #[arg(long, default_value_t = 3, value_parser = super::at_least_one)]
    pub rounds: usize,
    /// Jobs enqueued one at a time on an idle queue for the latency phase.
    #[arg(long, default_value_t = 1_000, value_parser = super::at_least_one)]
    pub latency_jobs: usize,
    #[command(flatten)]
    pub peers: super::queue_peers::PeerArgs,
    /// Measure the deep-queue phases (`queue_deep`) instead of the comparison.
    #[arg(long)]
    pub deep: bool,
    #[command(flatten)]
    pub deep_args: super::queue_deep::DeepArgs,
    /// Database the benchmark owns, named settle_bench*: created if missing, its jobs emptied
    /// before and between phases (graphile's side recreates `<database>_graphile`).
    #[arg(long, default_value = "settle_bench_queue")]
    pub database: String,
}

pub async fn run(args: QueueArgs, setup: Setup) -> anyhow::Result<()> {
    let setup = setup.on_database(&args.database)?;
    let config = &setup.config;
    let pool = crate::cli::open(config, true).await?;
    clear_jobs(&pool).await?;
    if args.deep {
        return super::queue_deep::run(&args.deep_args, &setup, &pool, args.workers).await;
    }
    let w = &config.worker;
    println!(
        "settle bench queue: {} no-op jobs, {} worker processes x concurrency {}, claim_batch {}, database {}",
        args.jobs, args.workers, w.concurrency, w.claim_batch, args.database
    );
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        println!("round {round}");
        let settle = settle_round(&setup, &pool, &args).await?;
        let graphile = super::queue_peers::graphile(&args.peers, &setup, &args).await?;
        rounds.push((settle, graphile));
    }
    let pgbench = super::queue_peers::pgbench(&args.peers, config, args.jobs).await?;
    super::queue_peers::print_ratios(&rounds, &pgbench);
    Ok(())
}

/// What one round of settle measured.
pub struct SettleRound {
    pub drain_jobs_per_s: f64,
    pub pickup_p50_ms: f64,
}

/// Starts the workers, measures pickup on the idle queue and then the drain of `args.jobs`,
/// stops the workers and empties the queue.
async fn settle_round(
    setup: &Setup,
    pool: &PgPool,
    args: &QueueArgs,
) -> anyhow::Result<SettleRound> {
    let workers = start_workers(setup, args.workers).await?;
    let (latency_p50, latency_p99) = latency_phase(pool, args.latency_jobs).await?;
    println!(
        "pickup   settle enqueue-to-start on an idle queue: p50 {latency_p50:.2} ms   p99 {latency_p99:.2} ms   ({} jobs, one at a time)",
        args.latency_jobs
    );

    clear_jobs(pool).await?;
    let started = Instant::now();
    enqueue_all(pool, args.jobs).await?;
    let enqueued = started.elapsed();
    wait_drained(pool, args.jobs).await?;
    let total = started.elapsed();
    let drain_rate = args.jobs as f64 / (total - enqueued).as_secs_f64();
    println!(
        "settle   {drain_rate:>9.0} jobs/s drain   ({:.0} jobs/s with the enqueue: enqueue {:.2} s + drain {:.2} s)",
        args.jobs as f64 / total.as_secs_f64(),
        enqueued.as_secs_f64(),
        (total - enqueued).as_secs_f64()
    );
    stop_workers(workers).await?;
    clear_jobs(pool).await?;
    Ok(SettleRound {
        drain_jobs_per_s: drain_rate,
        pickup_p50_ms: latency_p50,
    })
}

/// Starts `n` workers and lets them connect and LISTEN before any clock starts.
pub(super) async fn start_workers(setup: &Setup, n: usize) -> anyhow::Result<Vec<Child>> {
    let workers = (0..n)
        .map(|_| start_worker(setup))
        .collect::<anyhow::Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(workers)
}

/// SIGTERM to each worker, then waits for their graceful exits.
pub(super) async fn stop_workers(workers: Vec<Child>) -> anyhow::Result<()> {
    for mut worker in workers {
        stop_worker(&mut worker).await?;
    }
    Ok(())
}

fn start_worker(setup: &Setup) -> anyhow::Result<Child> {
    setup
        .command("worker", "warn", false)?
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

/// Empties the queue, live and finished jobs, between phases.
pub(super) async fn clear_jobs(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query!("truncate jobs, finished_jobs")
        .execute(pool)
        .await?;
    Ok(())
}

/// Enqueues `n` no-op jobs in one transaction (bulk statements of 10,000).
pub(super) async fn enqueue_all(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let mut left = n;
    while left > 0 {
        let chunk: Vec<NewJob> = (0..left.min(10_000))
            .map(|_| NewJob::new(kind::NOOP, json!({})))
            .collect();
        settle_workers::enqueue_many(&mut tx, &chunk).await?;
        left -= chunk.len();
    }
    tx.commit().await?;
    Ok(())
}

/// Waits until none of the `jobs` enqueued is queued or running. `exists` stops at the first
/// such row, as the graphile-worker side of the bench polls its own table; counting them read
/// every live row of `jobs` each 20 ms (a sequential scan once the statistics see a large
/// table), taking CPU from the workers being measured. The rounds time the drain to when this
/// returns, as graphile's side does; the deep bench takes its rates from Postgres' timestamps.
pub(super) async fn wait_drained(pool: &PgPool, jobs: usize) -> anyhow::Result<()> {
    let stuck = format!("{jobs} jobs not drained");
    poll_until(
        allowance(jobs),
        Duration::from_millis(20),
        &stuck,
        async || {
            let left = sqlx::query_scalar!(
            r#"select exists (select 1 from jobs where state in ('queued', 'running', 'cancelling'))
                   as "left!""#,
        )
        .fetch_one(pool)
        .await?;
            Ok(!left)
        },
    )
    .await
}

/// How long the workers get to run `jobs` jobs: a minute, plus the jobs at 50 a second, far
/// below any rate measured here (a loaded machine's and a debug build's included), so that only
/// workers that run nothing (exited, or on another database) reach it.
pub(super) fn allowance(jobs: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_secs_f64(jobs as f64 / 50.0)
}

/// Polls `done` every `every` until it says so; past `within`, fails saying `stuck`, so that a
/// benchmark whose workers run nothing stops with the reason instead of waiting forever.
pub(super) async fn poll_until(
    within: Duration,
    every: Duration,
    stuck: &str,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done().await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{stuck} within {} s: do the worker processes run, on this database? (their log is \
             above)",
            within.as_secs()
        );
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// Enqueues jobs one at a time, each after the previous one started, and returns the p50 and
/// p99 of `started_at - created_at` in milliseconds (both stamped by Postgres' clock).
async fn latency_phase(pool: &PgPool, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut conn = pool.acquire().await?;
    for _ in 0..n {
        let id = settle_workers::enqueue(&mut conn, &NewJob::new(kind::NOOP, json!({}))).await?;
        let stuck = format!("job {id} not started on an idle queue");
        poll_until(
            allowance(1),
            Duration::from_micros(500),
            &stuck,
            async || {
                Ok(sqlx::query_scalar!(
                    r#"select started_at is not null as "started!" from all_jobs where id = $1"#,
                    id
                )
                .fetch_one(&mut *conn)
                .await?)
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let latency = sqlx::query!(
        r#"select percentile_cont(0.5) within group (order by ms) as "p50!",
                  percentile_cont(0.99) within group (order by ms) as "p99!"
           from (select extract(epoch from started_at - created_at) * 1000 as ms from all_jobs) t"#,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((latency.p50, latency.p99))
}
