//! `settle bench settlement`: one settlement job over N seeded transactions through real `settle
//! api` and `settle worker` processes, against the single equivalent SQL statement (the same
//! `GROUP BY` as `COPY … TO` a file, same statistics and settings) in the same run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::TryStreamExt;
use serde_json::json;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use super::history;
use super::process::{ApiProcess, Setup};
use crate::settlement::results::{self, Download};
use crate::settlement::{DateRange, Zone};

#[derive(Debug, Args)]
pub struct SettlementBenchArgs {
    /// Transactions to settle.
    #[arg(long, default_value_t = 10_000_000)]
    pub transactions: u64,
    /// Days the seeded transactions spread over (the job settles all of them).
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// Merchants in the seeded data.
    #[arg(long, default_value_t = 1_000)]
    pub merchants: u32,
    /// Rows per checkpointed batch (the worker's `BATCH_SIZE`); default: `worker.batch_size`.
    #[arg(long)]
    pub batch_size: Option<i64>,
    /// Id sub-ranges aggregated at once; default: `settlement.parallel_parts`.
    #[arg(long)]
    pub parts: Option<u32>,
    /// Job-and-statement pairs to run; the median ratio is the figure.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Database the benchmark owns, named settle_bench*: created if missing; its transactions
    /// are reused if they were seeded with this run's --transactions, --days, --merchants
    /// and --late-row (recorded with them), else emptied and seeded anew.
    #[arg(long, default_value = "settle_bench_settlement")]
    pub database: String,
    /// After seeding, move the highest-id transaction into the one-day job's day (noon UTC,
    /// PAID): a transaction posted long after it was paid, which stretches that day's id span
    /// over the rest of the table. A run without it seeds the database anew: give it a
    /// `--database` of its own.
    #[arg(long)]
    pub late_row: bool,
}

pub async fn run(args: SettlementBenchArgs, setup: Setup) -> anyhow::Result<()> {
    let seed = history::of(args.transactions, args.days, args.merchants);
    // A one-day job on the same history: its cost must follow its range, not the table.
    let middle = seed.start + chrono::Days::new(u64::from(args.days) / 2);
    let late_row = args.late_row.then_some(middle);
    let (setup, pool, range) = history::seeded(setup, &args.database, &seed, late_row).await?;
    let config = &setup.config;
    let batch_size = args.batch_size.unwrap_or(config.worker.batch_size);
    let parts = args.parts.unwrap_or(config.settlement.parallel_parts);
    let one_day = DateRange::new(middle, middle, i64::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "settle bench settlement: {} transactions, {} days, {} merchants, batch {batch_size}, \
         {parts} parts at once, database {}",
        args.transactions, args.days, args.merchants, args.database
    );

    let api = ApiProcess::start(&setup).await?;
    let http = super::process::admin_client(&pool, reqwest::Client::builder()).await?;
    let log = super::TempFile::new("bench-worker", "log");
    let mut worker = start_worker(&setup, log.path(), batch_size, parts)?;
    let zone = Zone::parse(&config.settlement.time_zone).context("settlement.time_zone")?;
    let rows = args.transactions as f64;
    let mut ratios = Vec::new();
    let mut outcome = Ok(());
    // Job and statement alternate, so a slow spell of this shared machine hits both alike.
    for run in 1..=args.runs.max(1) {
        let measured = measure(&pool, &http, &api.base_url, range, zone).await;
        let Ok(m) = measured else {
            outcome = measured.map(|_| ());
            break;
        };
        println!(
            "run {run}: job {:>6.2} s ({:>9.0} rows/s)  statement {:>6.2} s ({:>9.0} rows/s)  \
             ratio {:.2}  CSV identical: {}",
            m.job_seconds,
            rows / m.job_seconds,
            m.statement_seconds,
            rows / m.statement_seconds,
            m.job_seconds / m.statement_seconds,
            m.same_csv
        );
        ratios.push(m.job_seconds / m.statement_seconds);
        if !m.same_csv {
            outcome = Err(anyhow::anyhow!(
                "job {}'s CSV differs from the single statement's",
                m.job_id
            ));
            break;
        }
    }
    let mut day_jobs = Vec::new();
    let mut month_jobs = Vec::new();
    if outcome.is_ok() {
        for run in 1..=args.runs.max(1) {
            let day = measure(&pool, &http, &api.base_url, one_day, zone).await?;
            let month = measure(&pool, &http, &api.base_url, range, zone).await?;
            let total = sqlx::query_scalar!(
                r#"select total as "total!" from all_jobs where id = $1"#,
                day.job_id
            )
            .fetch_one(&pool)
            .await?;
            println!(
                "one-day run {run}: job {:>6.2} s, total {total} of {} rows, CSV identical: {}; \
                 {}-day job {:>6.2} s; ratio {:.3}",
                day.job_seconds,
                args.transactions,
                day.same_csv,
                args.days,
                month.job_seconds,
                day.job_seconds / month.job_seconds
            );
            anyhow::ensure!(day.same_csv && month.same_csv, "a job's CSV differs");
            day_jobs.push(day.job_seconds);
            month_jobs.push(month.job_seconds);
        }
    }
    let peak_rss_kib = peak_rss_kib(&worker).unwrap_or(0);
    let _ = worker.kill().await;
    api.stop().await?;

    let log = tokio::fs::read_to_string(log.path())
        .await
        .unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("settlement")) {
        println!(
            "  worker: {}",
            line.split_once("settle::settlement::job: ")
                .map_or(line, |(_, m)| m)
        );
    }
    outcome?;
    ratios.sort_by(f64::total_cmp);
    println!(
        "worker peak RSS {:.1} MiB over {} runs",
        peak_rss_kib as f64 / 1024.0,
        ratios.len()
    );
    println!(
        "ratio job / statement: median {:.2}, min {:.2}, max {:.2}  (target <= 1.15, issue 11)",
        super::median(ratios.iter().copied()).expect("at least one run"),
        ratios[0],
        ratios[ratios.len() - 1]
    );
    if let (Some(day), Some(month)) = (super::median(day_jobs), super::median(month_jobs)) {
        println!(
            "one-day job / {}-day job: median {:.3} ({day:.2} s / {month:.2} s)  (target <= 0.05 at 100M rows, issue 11)",
            args.days,
            day / month,
        );
    }
    Ok(())
}

/// What one run measured.
struct Measured {
    job_id: i64,
    job_seconds: f64,
    statement_seconds: f64,
    same_csv: bool,
}

/// One run: the job through the api and worker, then (once the worker's vacuum is over) the
/// single statement, then the CSVs compared byte for byte.
async fn measure(
    pool: &PgPool,
    http: &reqwest::Client,
    api: &str,
    range: DateRange,
    zone: Zone,
) -> anyhow::Result<Measured> {
    let (job_id, job_seconds) = run_job(pool, http, api, range).await?;
    // The worker vacuums after the job completes; the statement's time must not share the
    // machine with it.
    let quiet = Instant::now();
    while sqlx::query_scalar!(
        r#"select exists (select 1 from pg_stat_activity
                          where query ilike 'vacuum%' and state = 'active') as "active!""#,
    )
    .fetch_one(pool)
    .await?
    {
        anyhow::ensure!(
            quiet.elapsed() < Duration::from_secs(60),
            "vacuum still running"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (statement_seconds, same_csv) = against_statement(pool, job_id, range, zone).await?;
    Ok(Measured {
        job_id,
        job_seconds,
        statement_seconds,
        same_csv,
    })
}

/// Runs the single statement over `range` into a file and compares it byte for byte with
/// job `job_id`'s CSV; returns the statement's seconds and whether the two are identical.
pub(super) async fn against_statement(
    pool: &PgPool,
    job_id: i64,
    range: DateRange,
    zone: Zone,
) -> anyhow::Result<(f64, bool)> {
    let file = std::env::temp_dir().join(format!("settle-bench-statement-{job_id}.csv"));
    let statement_seconds = single_statement(pool, range, zone, &file).await?;
    let same_csv = job_csv(pool, job_id).await? == tokio::fs::read(&file).await?;
    if same_csv {
        let _ = tokio::fs::remove_file(&file).await;
    } else {
        eprintln!(
            "kept {} to compare with job {job_id}'s /downloads/{job_id}.csv",
            file.display()
        );
    }
    Ok((statement_seconds, same_csv))
}

/// Job `job_id`'s CSV, as `GET /downloads/{id}.csv` streams it.
pub(super) async fn job_csv(pool: &PgPool, job_id: i64) -> anyhow::Result<Vec<u8>> {
    // Read at once, in this process: the stall bound cannot be reached.
    let stall = std::time::Duration::from_secs(60);
    let Download::Rows(chunks) = results::open(pool.acquire().await?, job_id, stall).await? else {
        anyhow::bail!("job {job_id} has no CSV in Postgres");
    };
    Ok(chunks
        .try_fold(Vec::new(), |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            Ok(all)
        })
        .await?)
}

fn start_worker(setup: &Setup, log: &Path, batch_size: i64, parts: u32) -> anyhow::Result<Child> {
    worker_command(setup, log, batch_size, parts)?
        .spawn()
        .context("starting settle worker")
}

/// A `settle worker` on the benchmark's database, logging its settlement phases to `log` (the
/// settlement bench prints their timings after the runs).
pub(super) fn worker_command(
    setup: &Setup,
    log: &Path,
    batch_size: i64,
    parts: u32,
) -> anyhow::Result<Command> {
    let log = std::fs::File::create(log)?;
    let mut command = setup.command("worker", "warn,settle::settlement=info", false)?;
    command
        .env("BATCH_SIZE", batch_size.to_string())
        .env("SETTLE_SETTLEMENT__PARALLEL_PARTS", parts.to_string())
        .env("NO_COLOR", "1")
        .stderr(log);
    Ok(command)
}

/// Posts the job and waits for COMPLETED; returns its id and the seconds from POST to done.
pub(super) async fn run_job(
    pool: &PgPool,
    http: &reqwest::Client,
    api: &str,
    range: DateRange,
) -> anyhow::Result<(i64, f64)> {
    let started = Instant::now();
    let url = format!("{api}/api/v1/jobs/settlement");
    let response = super::process::post_json(http, url, &json!(range.to_input())).await?;
    let id = response["job_id"]
        .as_i64()
        .context("job_id in the response")?;
    loop {
        let state = sqlx::query_scalar!(
            r#"select state::text as "state!" from all_jobs where id = $1"#,
            id
        )
        .fetch_one(pool)
        .await?;
        match state.as_str() {
            "completed" => return Ok((id, started.elapsed().as_secs_f64())),
            "failed" | "cancelled" => anyhow::bail!("settlement job {id} ended {state}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The worker's peak resident set (`VmHWM`), in KiB.
fn peak_rss_kib(worker: &Child) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.id()?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The whole settlement as one statement, with the job's settings, streamed to `file`.
async fn single_statement(
    pool: &PgPool,
    range: DateRange,
    zone: Zone,
    file: &PathBuf,
) -> anyhow::Result<f64> {
    let mut tx = pool.begin().await?;
    crate::settlement::set_local_tuning(&mut tx).await?;
    let day = zone.day_sql();
    // The same time bound the job uses, so the statement reads no more than it must either.
    let within = crate::settlement::input::paid_within(
        zone,
        &format!("'{}'", range.from()),
        &format!("'{}'", range.to()),
    );
    // Dynamic: the day expression and time bound hold the zone as a literal, and COPY takes no
    // parameters.
    let statement = format!(
        "copy (select merchant_id, {day} as date, sum(amount_cents)::int8 as gross_cents,
                      sum(fee_cents)::int8 as fee_cents,
                      (sum(amount_cents) - sum(fee_cents))::int8 as net_cents, count(*) as txn_count
               from transactions
               where status = 'PAID' and {day} between '{}' and '{}' and {within}
               group by merchant_id, {day}
               order by merchant_id collate \"C\", {day})
         to stdout with (format csv, header)",
        range.from(),
        range.to()
    );
    let started = Instant::now();
    let mut out =
        tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::create(file).await?);
    let mut stream = tx.copy_out_raw(&statement).await?;
    while let Some(chunk) = stream.try_next().await? {
        out.write_all(&chunk).await?;
    }
    drop(stream);
    out.flush().await?;
    out.get_ref().sync_all().await?;
    let seconds = started.elapsed().as_secs_f64();
    tx.rollback().await?;
    Ok(seconds)
}
