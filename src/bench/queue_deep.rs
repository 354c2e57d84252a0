//! `settle bench queue --deep`: does the claim stay fast when the queue is deep, and after many
//! drains with autovacuum on?
//!
//! 1. After an untimed warm-up drain, the rate of the worker processes with `shallow_queue` jobs
//!    queued (the first half of them timed, the rest drained, and re-queued until
//!    `measured_jobs` were timed) against the rate of the first `measured_jobs` of `deep_queue`
//!    queued jobs, with the ratio. Both are timed alike: from the enqueue's commit to the finish
//!    of the last timed job, with more jobs queued behind it.
//! 2. `cycles` drains of `cycle_jobs` jobs each with autovacuum on (turned on for this phase when
//!    the server has it off, and turned back off after), each cycle's rate, the jobs table's
//!    sizes and the finished jobs' table's. Finished jobs stay, as they do for
//!    `worker.retention_hours`.
//!
//! Rates run from the enqueue's commit to the jobs' `finished_at`, both Postgres' clock.
//! Phase 1 times both sides alike, after the warm-up, because anything only one side pays moves
//! the ratio: cold workers, or a drain's tail (the last jobs finishing while most workers idle),
//! once counted against the shallow side only, and the same depth on both sides gave ratios of
//! 1.09-2.59 (BENCHMARKS.md).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sqlx::PgPool;

use super::process::Setup;
use super::queue::{
    allowance, clear_jobs, enqueue_all, poll_until, start_workers, stop_workers, wait_drained,
};

#[derive(Debug, Args)]
pub struct DeepArgs {
    /// Jobs queued for the shallow rate.
    #[arg(long, default_value_t = 10_000, value_parser = super::at_least_one)]
    pub shallow_queue: usize,
    /// Jobs queued for the deep rate (at least `--measured-jobs`).
    #[arg(long, default_value_t = 1_000_000, value_parser = super::at_least_one)]
    pub deep_queue: usize,
    /// Jobs timed at each depth.
    #[arg(long, default_value_t = 100_000, value_parser = super::at_least_one)]
    pub measured_jobs: usize,
    /// Drain cycles with autovacuum on.
    #[arg(long, default_value_t = 10)]
    pub cycles: usize,
    /// Jobs enqueued and drained in each cycle.
    #[arg(long, default_value_t = 100_000, value_parser = super::at_least_one)]
    pub cycle_jobs: usize,
}

pub async fn run(
    deep: &DeepArgs,
    setup: &Setup,
    pool: &PgPool,
    workers: usize,
) -> anyhow::Result<()> {
    let config = &setup.config;
    anyhow::ensure!(
        deep.measured_jobs <= deep.deep_queue,
        "--measured-jobs {} is more than the --deep-queue {} it is timed in",
        deep.measured_jobs,
        deep.deep_queue
    );
    println!(
        "settle bench queue --deep: {workers} worker processes x concurrency {}, claim_batch {}",
        config.worker.concurrency, config.worker.claim_batch
    );
    let running = start_workers(setup, workers).await?;
    // The workers' first jobs pay for their connections, prepared statements and caches, which
    // neither rate should.
    enqueue_all(pool, deep.shallow_queue).await?;
    wait_drained(pool, deep.shallow_queue).await?;
    clear_jobs(pool).await?;
    println!("warm-up  {} jobs drained, untimed", deep.shallow_queue);
    let (shallow, timed) = shallow_rate(pool, deep).await?;
    println!(
        "shallow  {shallow:>9.0} jobs/s   ({} queued, the first {timed} timed, the rest drained; \
         re-queued until {} were timed)",
        deep.shallow_queue, deep.measured_jobs
    );
    let deep_rate = deep_rate(pool, deep).await?;
    println!(
        "deep     {deep_rate:>9.0} jobs/s   (the first {} of {} queued)",
        deep.measured_jobs, deep.deep_queue
    );
    println!(
        "ratio    deep / shallow = {:.2}   (issue 11: >= 0.8)",
        deep_rate / shallow
    );
    stop_workers(running).await?;
    clear_jobs(pool).await?;
    if deep.cycles == 0 {
        return Ok(());
    }
    let autovacuum = sqlx::query_scalar!(r#"select current_setting('autovacuum') as "on!""#)
        .fetch_one(pool)
        .await?;
    if autovacuum != "on" {
        println!("autovacuum is off on this server: on for the cycles (ALTER SYSTEM), then reset");
        set_autovacuum(pool, true).await?;
    }
    let cycled = cycles(deep, setup, pool, workers).await;
    if autovacuum != "on" {
        set_autovacuum(pool, false).await?;
    }
    cycled
}

/// The Postgres clock now, in seconds since the epoch.
async fn now(pool: &PgPool) -> anyhow::Result<f64> {
    Ok(
        sqlx::query_scalar!(r#"select extract(epoch from clock_timestamp())::float8 as "now!""#)
            .fetch_one(pool)
            .await?,
    )
}

/// The newest `finished_at`, in seconds since the epoch.
async fn last_finished(pool: &PgPool) -> anyhow::Result<f64> {
    sqlx::query_scalar!(r#"select extract(epoch from max(finished_at))::float8 from finished_jobs"#)
        .fetch_one(pool)
        .await?
        .context("no job finished")
}

/// The rate with `shallow_queue` jobs queued, and the jobs timed in each round: each round times
/// the first half of its jobs, so the queue stays between full and half full and, as in
/// [`deep_rate`], no drain tail counts; the rest are drained untimed.
async fn shallow_rate(pool: &PgPool, deep: &DeepArgs) -> anyhow::Result<(f64, usize)> {
    let timed = (deep.shallow_queue / 2).max(1);
    let rounds = deep.measured_jobs.div_ceil(timed);
    let mut seconds = 0.0;
    for _ in 0..rounds {
        enqueue_all(pool, deep.shallow_queue).await?;
        seconds += seconds_to_finish(pool, timed, deep.shallow_queue).await?;
        wait_drained(pool, deep.shallow_queue).await?;
        clear_jobs(pool).await?;
    }
    Ok(((rounds * timed) as f64 / seconds, timed))
}

/// The rate of the first `measured_jobs` of `deep_queue` queued jobs.
async fn deep_rate(pool: &PgPool, deep: &DeepArgs) -> anyhow::Result<f64> {
    let started = Instant::now();
    enqueue_all(pool, deep.deep_queue).await?;
    let enqueued = started.elapsed();
    let seconds = seconds_to_finish(pool, deep.measured_jobs, deep.deep_queue).await?;
    println!(
        "deep     enqueued {} jobs in {:.1} s",
        deep.deep_queue,
        enqueued.as_secs_f64()
    );
    Ok(deep.measured_jobs as f64 / seconds)
}

/// Seconds from now, just after the commit of `queued` jobs into an empty queue, to the `n`th
/// of them to finish, both on Postgres' clock.
async fn seconds_to_finish(pool: &PgPool, n: usize, queued: usize) -> anyhow::Result<f64> {
    let committed = now(pool).await?;
    let (within, stuck) = (allowance(n), format!("{n} of {queued} jobs not finished"));
    let n = n as i64;
    poll_until(within, Duration::from_millis(100), &stuck, async || {
        let finished = sqlx::query_scalar!(r#"select count(*) as "n!" from finished_jobs"#)
            .fetch_one(pool)
            .await?;
        Ok(finished >= n)
    })
    .await?;
    let nth = sqlx::query_scalar!(
        r#"select extract(epoch from finished_at)::float8 as "at!" from finished_jobs
           order by finished_at offset $1 limit 1"#,
        n - 1
    )
    .fetch_one(pool)
    .await?;
    Ok(nth - committed)
}

async fn cycles(
    deep: &DeepArgs,
    setup: &Setup,
    pool: &PgPool,
    workers: usize,
) -> anyhow::Result<()> {
    let running = start_workers(setup, workers).await?;
    println!(
        "cycle     jobs/s   total MiB  heap MiB  indexes MiB  claim index KiB  live rows  dead rows  autovacuums  finished MiB"
    );
    for cycle in 1..=deep.cycles {
        enqueue_all(pool, deep.cycle_jobs).await?;
        let committed = now(pool).await?;
        wait_drained(pool, deep.cycle_jobs).await?;
        let rate = deep.cycle_jobs as f64 / (last_finished(pool).await? - committed);
        let s = sqlx::query!(
            r#"select pg_total_relation_size('jobs') as "total!",
                      pg_relation_size('jobs') as "heap!",
                      pg_indexes_size('jobs') as "indexes!",
                      coalesce(pg_relation_size(to_regclass('jobs_claimable_idx')), 0) as "claim!",
                      n_live_tup as "live!", n_dead_tup as "dead!",
                      autovacuum_count as "autovacuums!",
                      pg_total_relation_size('finished_jobs') as "finished!"
               from pg_stat_user_tables where relid = 'jobs'::regclass"#
        )
        .fetch_one(pool)
        .await?;
        let mib = |bytes: i64| bytes as f64 / (1024.0 * 1024.0);
        println!(
            "{cycle:>5} {rate:>10.0} {:>11.1} {:>9.1} {:>12.1} {:>16.0} {:>10} {:>10} {:>12} {:>13.1}",
            mib(s.total),
            mib(s.heap),
            mib(s.indexes),
            s.claim as f64 / 1024.0,
            s.live,
            s.dead,
            s.autovacuums,
            mib(s.finished)
        );
    }
    stop_workers(running).await
}

/// Turns autovacuum on, or back to the server's configured value, and reloads the configuration.
async fn set_autovacuum(pool: &PgPool, on: bool) -> anyhow::Result<()> {
    if on {
        sqlx::query!("alter system set autovacuum = on")
            .execute(pool)
            .await
            .context("ALTER SYSTEM needs a superuser; run with --cycles 0 otherwise")?;
    } else {
        sqlx::query!("alter system reset autovacuum")
            .execute(pool)
            .await?;
    }
    sqlx::query_scalar!("select pg_reload_conf()")
        .fetch_one(pool)
        .await?;
    Ok(())
}
