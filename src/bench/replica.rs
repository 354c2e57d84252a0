//! `settle bench replica`: what a settlement costs the primary when its batches read on a hot
//! standby (`database.read_url`) instead. Alternates a job whose worker reads on the primary
//! with one whose worker reads on the standby, over the same seeded history, and measures the
//! CPU the primary's server processes spent during each (`bench/replica.sh` makes a private
//! primary and standby to run it against).

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use sqlx::PgPool;

use super::history;
use super::process::{ApiProcess, Setup};
use super::settlement::{job_csv, run_job, worker_command};

#[derive(Debug, Args)]
pub struct ReplicaBenchArgs {
    /// A hot standby of the server at `database.url` (e.g. made by `pg_basebackup -R`).
    #[arg(long)]
    pub read_url: String,
    /// Transactions to settle.
    #[arg(long, default_value_t = 10_000_000)]
    pub transactions: u64,
    /// Pairs of jobs (primary reads, standby reads) to run; the medians are the figures.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Database the benchmark owns on the primary, named settle_bench*: created if missing;
    /// its transactions are reused if they were seeded as this run asks (recorded with them),
    /// else emptied and seeded anew.
    #[arg(long, default_value = "settle_bench_settlement")]
    pub database: String,
}

pub async fn run(args: ReplicaBenchArgs, setup: Setup) -> anyhow::Result<()> {
    // `bench settlement`'s defaults, so the two reuse one seeded database.
    let seed = super::history::of(args.transactions, 30, 1_000);
    let (setup, pool, range) = history::seeded(setup, &args.database, &seed, None).await?;
    let config = &setup.config;
    // The standby holds the primary's databases under the same names.
    let read_url = super::process::with_database(&args.read_url, &args.database)?;
    let postmaster = Postmaster::of(&pool).await?;
    println!(
        "settle bench replica: {} transactions, {} days, primary postmaster pid {}, standby {}",
        args.transactions, seed.days, postmaster.0, args.read_url
    );
    let api = ApiProcess::start(&setup).await?;
    let http = super::process::admin_client(&pool, reqwest::Client::builder()).await?;
    let (mut on_primary, mut on_standby) = (Vec::new(), Vec::new());
    let log = super::TempFile::new("bench-worker", "log");
    for run in 1..=args.runs.max(1) {
        let mut csvs = Vec::new();
        for standby in [false, true] {
            let mut command = worker_command(
                &setup,
                log.path(),
                config.worker.batch_size,
                config.settlement.parallel_parts,
            )?;
            if standby {
                command.env("SETTLE_DATABASE__READ_URL", &read_url);
            }
            let mut worker = command.spawn().context("starting settle worker")?;
            let before = postmaster.cpu_seconds()?;
            let started = Instant::now();
            let (job_id, _) = run_job(&pool, &http, &api.base_url, range).await?;
            let seconds = started.elapsed().as_secs_f64();
            let cpu = postmaster.cpu_seconds()? - before;
            let _ = worker.kill().await;
            println!(
                "run {run}: reads on the {:<8} job {seconds:>6.2} s, primary CPU {cpu:>6.2} s",
                if standby { "standby" } else { "primary" }
            );
            (if standby {
                &mut on_standby
            } else {
                &mut on_primary
            })
            .push((seconds, cpu));
            csvs.push(job_csv(&pool, job_id).await?);
        }
        anyhow::ensure!(
            csvs[0] == csvs[1],
            "the standby job's CSV differs from the primary job's"
        );
    }
    api.stop().await?;
    let (primary_cpu, standby_cpu) = (median(&on_primary, |m| m.1), median(&on_standby, |m| m.1));
    println!(
        "primary CPU per job: median {primary_cpu:.2} s reading on the primary, \
         {standby_cpu:.2} s reading on the standby: ratio {:.2}; job time median {:.2} s vs {:.2} s; \
         CSVs identical",
        standby_cpu / primary_cpu,
        median(&on_primary, |m| m.0),
        median(&on_standby, |m| m.0),
    );
    Ok(())
}

/// The median of `of` over the runs (there is at least one).
fn median(measured: &[(f64, f64)], of: impl Fn(&(f64, f64)) -> f64) -> f64 {
    super::median(measured.iter().map(of)).expect("at least one run")
}

/// The primary's postmaster, whose processes' CPU time is what a job costs the primary.
struct Postmaster(u32);

impl Postmaster {
    /// The parent of this connection's backend.
    async fn of(pool: &PgPool) -> anyhow::Result<Self> {
        let backend: i32 = sqlx::query_scalar!(r#"select pg_backend_pid() as "pid!""#)
            .fetch_one(pool)
            .await?;
        let stat = ProcStat::read(backend as u32).context("the server must run on this host")?;
        Ok(Self(stat.parent))
    }

    /// CPU seconds of the postmaster, its live children and the children it has reaped
    /// (backends and parallel workers that exited count through the postmaster's `cutime`).
    /// Read from `/proc` by hand: one field list, not worth a crate.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let own = ProcStat::read(self.0).context("reading the postmaster's /proc stat")?;
        let mut ticks = own.ticks + own.reaped_ticks;
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some(child) = ProcStat::read(pid).filter(|s| s.parent == self.0) {
                ticks += child.ticks;
            }
        }
        Ok(ticks as f64 / USER_HZ)
    }
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times: Linux reports them in USER_HZ, which
/// its user-space ABI fixes at 100.
const USER_HZ: f64 = 100.0;

/// The fields of `/proc/<pid>/stat` the CPU figure needs.
struct ProcStat {
    parent: u32,
    /// utime + stime.
    ticks: u64,
    /// cutime + cstime: children waited for.
    reaped_ticks: u64,
}

impl ProcStat {
    fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces; the fields after it are plain.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        Some(Self {
            parent: u32::try_from(field(4)?).ok()?,
            ticks: field(14)? + field(15)?,
            reaped_ticks: field(16)? + field(17)?,
        })
    }
}
