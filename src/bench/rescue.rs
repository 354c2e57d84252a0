//! `settle bench rescue`: how soon a SIGKILLed worker's job moves on. Two `settle worker`
//! processes share one settlement job; its holder is SIGKILLed while the other waits, and a new
//! worker is started at once so one always waits. Per kill it measures the time from the kill
//! to the job's re-claim (its attempt grows) and to its progress growing again (the new holder's
//! first committed batch), then checks that the finished settlement is byte for byte the single
//! GROUP BY statement's. A second job, killed the same way with a grace no probe outlasts, is
//! the baseline: rescue at lease expiry, as before the liveness locks.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use settle_workers::NewJob;
use sqlx::PgPool;
use tokio::process::Child;

use super::process::Setup;
use crate::settlement::{DateRange, Zone};

#[derive(Debug, Args)]
pub struct RescueArgs {
    /// Transactions the settlement reads.
    #[arg(long, default_value_t = 5_000_000)]
    pub transactions: u64,
    /// SIGKILLs of the job's holder.
    #[arg(long, default_value_t = 5)]
    pub kills: u32,
    /// SIGKILLs of the baseline phase, whose jobs move on at lease expiry only.
    #[arg(long, default_value_t = 2)]
    pub baseline_kills: u32,
    /// How long the job runs after each resumption before its holder is killed again, in ms.
    /// Short, so that all the kills fit in the job on a fast machine (it waits for the job to
    /// progress first, so no kill comes before a resumption shows).
    #[arg(long, default_value_t = 150)]
    pub run_ms: u64,
    /// Rows per checkpointed batch: small, so a batch's time adds little to the measured
    /// resumption.
    #[arg(long, default_value_t = 100_000)]
    pub batch_size: i64,
    /// Database the benchmark owns, named settle_bench*: created if missing; its transactions
    /// are reused if they were seeded as this run asks (recorded with them), else emptied and
    /// seeded anew.
    #[arg(long, default_value = "settle_bench_rescue")]
    pub database: String,
}

pub async fn run(args: RescueArgs, setup: Setup) -> anyhow::Result<()> {
    let seed = super::history::of(args.transactions, 30, 1_000);
    let (setup, pool, range) = super::history::seeded(setup, &args.database, &seed, None).await?;
    let config = &setup.config;
    let zone = Zone::parse(&config.settlement.time_zone).context("settlement.time_zone")?;
    let w = &config.worker;
    println!(
        "settle bench rescue: a settlement of {} transactions (batch {}, {} parts), {} SIGKILLs of \
         its holder, 2 workers; lease {} ms, rescue_probe {} ms, rescue_grace {} ms",
        args.transactions,
        args.batch_size,
        config.settlement.parallel_parts,
        args.kills,
        w.lease_ms,
        w.rescue_probe_ms,
        w.rescue_grace_ms
    );
    let job = Phase {
        pool: &pool,
        setup: &setup,
        args: &args,
        range,
        zone,
    };
    let (mut fast_reclaims, mut fast_resumes) = job.run(args.kills, &[]).await?;
    println!(
        "liveness lock, re-claimed after a kill: {}",
        summary(&mut fast_reclaims)
    );
    // The same kills with a grace no probe outlasts: the jobs move on at lease expiry, as before
    // the liveness locks.
    let (mut slow_reclaims, mut slow_resumes) = job
        .run(
            args.baseline_kills,
            &[("SETTLE_WORKER__RESCUE_GRACE_MS", "3600000")],
        )
        .await?;
    println!(
        "lease only, re-claimed after a kill: {}",
        summary(&mut slow_reclaims)
    );
    println!(
        "lease only, progress again after a kill: {}",
        summary(&mut slow_resumes)
    );
    println!(
        "liveness lock, progress again after a kill: {}  (target: median <= 2 s, max <= 4 s)",
        summary(&mut fast_resumes)
    );
    if !fast_resumes.is_empty() && !slow_resumes.is_empty() {
        println!(
            "ratio of medians, liveness lock / lease only: {:.2}",
            median(&fast_resumes) / median(&slow_resumes)
        );
    }
    println!("each job's CSV identical to the single statement's: true");
    Ok(())
}

/// One job through a run of kills, with these extra worker settings.
struct Phase<'a> {
    pool: &'a PgPool,
    setup: &'a Setup,
    args: &'a RescueArgs,
    range: DateRange,
    zone: Zone,
}

impl Phase<'_> {
    /// Runs a settlement, SIGKILLing its holder `kills` times (fewer if it ends first), and
    /// checks its result; returns the seconds to each re-claim and to each resumed progress.
    async fn run(&self, kills: u32, env: &[(&str, &str)]) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let (pool, id) = (self.pool, enqueue(self.pool, self.range, kills).await?);
        let start = || start_worker(self.setup, self.args, env);
        let mut workers = vec![start()?, start()?];
        wait_first_progress(pool, id).await?;
        let (mut reclaims, mut resumes) = (Vec::new(), Vec::new());
        for kill in 1..=kills {
            tokio::time::sleep(Duration::from_millis(self.args.run_ms)).await;
            let before = job_now(pool, id).await?;
            if before.state != "running" {
                println!("the job ended after {} kills", kill - 1);
                break;
            }
            let owner = before.lease_owner.context("a running job has an owner")?;
            let held_by = |w: &Child| {
                w.id()
                    .is_some_and(|pid| owner.starts_with(&format!("{pid}-")))
            };
            let at = workers
                .iter()
                .position(held_by)
                .context("the job is held by a worker of this benchmark")?;
            let mut holder = workers.remove(at);
            holder.start_kill()?;
            let killed = Instant::now();
            holder.wait().await?;
            workers.push(start()?);
            let (reclaimed, resumed) = wait_resumed(pool, id, before.attempt, killed).await?;
            println!(
                "kill {kill}: at {} of {} rows; re-claimed after {reclaimed:.2} s, progress \
                 again after {resumed:.2} s",
                before.processed,
                before.total.unwrap_or(0)
            );
            reclaims.push(reclaimed);
            resumes.push(resumed);
        }
        wait_completed(pool, id).await?;
        let (_, exact) =
            super::settlement::against_statement(pool, id, self.range, self.zone).await?;
        anyhow::ensure!(exact, "job {id}'s CSV differs from the single statement's");
        Ok((reclaims, resumes))
    }
}

/// The median of `seconds` (there is at least one).
fn median(seconds: &[f64]) -> f64 {
    super::median(seconds.iter().copied()).expect("at least one kill")
}

/// "median M s, max X s over N kills" of `seconds`.
fn summary(seconds: &mut [f64]) -> String {
    seconds.sort_by(f64::total_cmp);
    match seconds {
        [] => "no kill measured".to_owned(),
        _ => format!(
            "median {:.2} s, min {:.2} s, max {:.2} s over {} kills",
            median(seconds),
            seconds[0],
            seconds[seconds.len() - 1],
            seconds.len()
        ),
    }
}

fn start_worker(setup: &Setup, args: &RescueArgs, env: &[(&str, &str)]) -> anyhow::Result<Child> {
    setup
        .command("worker", "warn", false)?
        .envs(env.iter().copied())
        .env("BATCH_SIZE", args.batch_size.to_string())
        .spawn()
        .context("starting settle worker")
}

/// Enqueues the settlement with room for every kill in its attempts (a rescue spends one).
async fn enqueue(pool: &PgPool, range: DateRange, kills: u32) -> anyhow::Result<i64> {
    let args = serde_json::to_value(range.to_input())?;
    let job = NewJob::new(crate::settlement::job::KIND, args).max_attempts(kills as i32 + 5);
    let mut conn = pool.acquire().await?;
    Ok(settle_workers::enqueue(&mut conn, &job).await?)
}

/// The job as the benchmark polls it.
struct JobNow {
    state: String,
    attempt: i32,
    processed: i64,
    total: Option<i64>,
    lease_owner: Option<String>,
}

async fn job_now(pool: &PgPool, id: i64) -> anyhow::Result<JobNow> {
    Ok(sqlx::query_as!(
        JobNow,
        r#"select state::text as "state!", attempt as "attempt!", processed as "processed!",
                  total, lease_owner
           from all_jobs where id = $1"#,
        id
    )
    .fetch_one(pool)
    .await?)
}

/// Polls the job every 5 ms until `done` says it is there, failing after a minute or if the
/// job ended in failure.
async fn poll_job(
    pool: &PgPool,
    id: i64,
    mut done: impl FnMut(&JobNow) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = job_now(pool, id).await?;
        anyhow::ensure!(
            !matches!(job.state.as_str(), "failed" | "cancelled"),
            "settlement job {id} ended {}",
            job.state
        );
        if done(&job) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "job {id} stuck: {}", job.state);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_first_progress(pool: &PgPool, id: i64) -> anyhow::Result<()> {
    poll_job(pool, id, |job| job.processed > 0).await
}

async fn wait_completed(pool: &PgPool, id: i64) -> anyhow::Result<()> {
    poll_job(pool, id, |job| job.state == "completed").await
}

/// Seconds from `killed` until the job was claimed again (its attempt past `attempt`), and
/// until its progress grew past what that claim resumed from (or it completed).
async fn wait_resumed(
    pool: &PgPool,
    id: i64,
    attempt: i32,
    killed: Instant,
) -> anyhow::Result<(f64, f64)> {
    let mut reclaimed: Option<(f64, i64)> = None;
    let mut resumed = 0.0;
    poll_job(pool, id, |job| {
        let seconds = killed.elapsed().as_secs_f64();
        if reclaimed.is_none() && job.attempt > attempt {
            reclaimed = Some((seconds, job.processed));
        }
        let grew =
            reclaimed.is_some_and(|(_, from)| job.processed > from || job.state == "completed");
        resumed = seconds;
        grew
    })
    .await?;
    Ok((reclaimed.map_or(resumed, |(at, _)| at), resumed))
}
