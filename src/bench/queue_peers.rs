//! The baselines of `settle bench queue`, run on the same machine and Postgres server in the
//! same sitting: graphile-worker through its own Node runner (`bench/graphile/`), and a pgbench
//! claim-and-complete loop on a minimal hand-written queue table (`bench/queue-*.sql`).
//! Either is skipped with a message where its tool (node and npm, or psql and pgbench) is missing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::median;
use super::process::Setup;
use super::queue::{QueueArgs, SettleRound};
use crate::config::Config;

const PGBENCH_SETUP: &str = include_str!("../../bench/queue-setup.sql");
const PGBENCH_SCRIPT: &str = include_str!("../../bench/queue-claim.sql");

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// graphile-worker, installed by `npm ci` into bench/graphile/node_modules on first use.
    Graphile,
    /// No peer queue: settle and the pgbench loop only.
    None,
}

#[derive(Debug, Args)]
pub struct PeerArgs {
    /// Peer queue drained in the same run as settle.
    #[arg(long, value_enum, default_value_t = Peer::Graphile)]
    pub peer: Peer,
    /// Folder of the graphile runner (package.json, package-lock.json, run.js).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/graphile"))]
    pub graphile_dir: PathBuf,
    /// graphile's concurrentJobs per process (its performance page: 24).
    #[arg(long, default_value_t = 24)]
    pub graphile_concurrency: usize,
    /// graphile's localQueue.size (its performance page: 500).
    #[arg(long, default_value_t = 500)]
    pub graphile_local_queue: usize,
    /// graphile's completeJobBatchDelay and failJobBatchDelay in ms (its performance page: 0).
    #[arg(long, default_value_t = 0)]
    pub graphile_complete_delay_ms: i64,
    /// pgbench client counts of the claim-and-complete baseline, one run each.
    #[arg(long, value_delimiter = ',', default_value = "4,16", value_parser = super::at_least_one)]
    pub pgbench_clients: Vec<usize>,
    /// Jobs per pgbench claim (default: worker.claim_batch, as settle claims).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub pgbench_batch: Option<i64>,
}

/// The figures graphile's runner prints as its last line.
#[derive(Debug, Deserialize)]
pub struct GraphileRun {
    pub version: String,
    pub enqueue_s: f64,
    pub drain_s: f64,
    pub drain_jobs_per_s: f64,
    pub pickup_p50_ms: f64,
    pub pickup_p99_ms: f64,
}

/// Prints each round's settle / graphile, then the medians over the rounds: the ratio, the
/// pickups, and settle's median drain against pgbench's best.
pub fn print_ratios(rounds: &[(SettleRound, Option<GraphileRun>)], pgbench: &[(usize, f64)]) {
    let paired: Vec<f64> = rounds
        .iter()
        .filter_map(|(s, g)| g.as_ref().map(|g| s.drain_jobs_per_s / g.drain_jobs_per_s))
        .collect();
    if !paired.is_empty() {
        let each: Vec<String> = paired.iter().map(|r| format!("{r:.2}")).collect();
        println!("rounds   settle / graphile: {}", each.join(", "));
    }
    let settle_p50 =
        median(rounds.iter().map(|(s, _)| s.pickup_p50_ms)).expect("at least one round");
    let mut line = format!(
        "ratio    median of {} rounds: pickup p50 settle {settle_p50:.2} ms",
        rounds.len()
    );
    let graphile_p50 = median(
        rounds
            .iter()
            .filter_map(|(_, g)| g.as_ref().map(|g| g.pickup_p50_ms)),
    );
    if let (Some(p50), Some(ratio)) = (graphile_p50, median(paired)) {
        line += &format!(", graphile {p50:.2} ms   settle / graphile = {ratio:.2}");
    }
    let settle_drain = median(rounds.iter().map(|(s, _)| s.drain_jobs_per_s));
    if let (Some(drain), Some((clients, best))) = (
        settle_drain,
        pgbench.iter().max_by(|a, b| a.1.total_cmp(&b.1)),
    ) {
        line += &format!(
            "   settle / pgbench = {:.2} (its best, {clients} clients)",
            drain / best
        );
    }
    println!("{line}   (issue 11: settle >= 1.0x graphile, pickup p50 < 2 ms)");
}

/// Whether `program --version` runs.
async fn present(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// One graphile run in its best configuration, `None` with `--peer none` or where node or npm
/// is missing.
pub async fn graphile(
    peers: &PeerArgs,
    setup: &Setup,
    args: &QueueArgs,
) -> anyhow::Result<Option<GraphileRun>> {
    if peers.peer == Peer::None {
        return Ok(None);
    }
    if !(present("node").await && present("npm").await) {
        println!("graphile skipped: node and npm are not both installed");
        return Ok(None);
    }
    let dir = &peers.graphile_dir;
    if !dir.join("node_modules/graphile-worker").exists() {
        println!(
            "graphile: npm ci into {}",
            dir.join("node_modules").display()
        );
        run_ok(
            Command::new("npm").args(["ci", "--no-audit", "--no-fund"]),
            dir,
        )
        .await?;
    }
    let database = format!("{}_graphile", args.database);
    let url = setup.clone().on_database(&database)?.config.database.url;
    let output = Command::new("node")
        .arg("run.js")
        .arg("bench")
        .args(["--url", &url])
        .args(["--jobs", &args.jobs.to_string()])
        .args(["--workers", &args.workers.to_string()])
        .args(["--concurrency", &peers.graphile_concurrency.to_string()])
        .args(["--pool", &(peers.graphile_concurrency + 1).to_string()])
        .args(["--local-queue", &peers.graphile_local_queue.to_string()])
        .args([
            "--complete-delay",
            &peers.graphile_complete_delay_ms.to_string(),
        ])
        .args(["--latency-jobs", &args.latency_jobs.to_string()])
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("running node bench/graphile/run.js")?;
    anyhow::ensure!(output.status.success(), "graphile runner failed");
    let stdout = String::from_utf8(output.stdout)?;
    let last = stdout
        .lines()
        .last()
        .context("graphile runner printed nothing")?;
    let g: GraphileRun = serde_json::from_str(last).context("graphile runner's figures")?;
    println!(
        "graphile {:>9.0} jobs/s drain   (graphile-worker {}, {} processes x concurrency {}, localQueue {}, completeJobBatchDelay {} ms; add_jobs {:.2} s + drain {:.2} s; database {database})",
        g.drain_jobs_per_s,
        g.version,
        args.workers,
        peers.graphile_concurrency,
        peers.graphile_local_queue,
        peers.graphile_complete_delay_ms,
        g.enqueue_s,
        g.drain_s
    );
    println!(
        "pickup   graphile add_job-to-lock on idle workers: p50 {:.2} ms   p99 {:.2} ms",
        g.pickup_p50_ms, g.pickup_p99_ms
    );
    Ok(Some(g))
}

/// The pgbench claim-and-complete loop at each of `--pgbench-clients`: (clients, jobs/s).
pub async fn pgbench(
    peers: &PeerArgs,
    config: &Config,
    jobs: usize,
) -> anyhow::Result<Vec<(usize, f64)>> {
    if !(present("psql").await && present("pgbench").await) {
        println!("pgbench skipped: psql and pgbench are not both installed");
        return Ok(Vec::new());
    }
    let url = &config.database.url;
    let batch = peers.pgbench_batch.unwrap_or(config.worker.claim_batch);
    let script = super::TempFile::new("queue-claim", "sql");
    tokio::fs::write(script.path(), PGBENCH_SCRIPT).await?;
    let rates = pgbench_runs(peers, url, batch, jobs, script.path()).await;
    // On failure too: the table holds every job of the last run.
    let dropped = psql_stdin(url, "jobs=0", "drop table if exists pgbench_jobs;").await;
    let rates = rates?;
    dropped?;
    Ok(rates)
}

/// One pgbench run of `script` for each of `--pgbench-clients`, each on a table of `jobs`
/// queued jobs made anew: (clients, jobs/s).
async fn pgbench_runs(
    peers: &PeerArgs,
    url: &str,
    batch: i64,
    jobs: usize,
    script: &Path,
) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut rates = Vec::new();
    for &clients in &peers.pgbench_clients {
        psql_stdin(url, &format!("jobs={jobs}"), PGBENCH_SETUP).await?;
        // Enough claims of `batch` for every job: each claim takes a full batch until the end.
        let per_client = jobs.div_ceil(clients * batch as usize);
        let started = Instant::now();
        run_ok(
            Command::new("pgbench")
                .args(["-n", "-M", "prepared", "-D", &format!("batch={batch}")])
                .args([
                    "-c",
                    &clients.to_string(),
                    "-j",
                    &clients.min(2).to_string(),
                ])
                .args(["-t", &per_client.to_string(), "-f"])
                .arg(script)
                .arg(url)
                .stdout(Stdio::null()),
            Path::new("."),
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        let done = psql_stdin(
            url,
            "jobs=0",
            "select count(*) from pgbench_jobs where state = 'completed';",
        )
        .await?;
        let done: usize = done.trim().parse().context("pgbench_jobs count")?;
        anyhow::ensure!(done == jobs, "pgbench completed {done} of {jobs} jobs");
        let rate = jobs as f64 / seconds;
        println!(
            "pgbench  {rate:>9.0} jobs/s         ({clients} clients, claim {batch} + complete per loop, {seconds:.2} s, on a minimal queue table: primary key + due index)"
        );
        rates.push((clients, rate));
    }
    Ok(rates)
}

/// Runs `sql` through psql on `url` with one `-v` variable; returns its unaligned output.
async fn psql_stdin(url: &str, variable: &str, sql: &str) -> anyhow::Result<String> {
    let mut child = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            variable,
            "-f",
            "-",
        ])
        .arg(url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting psql")?;
    let mut stdin = child.stdin.take().context("psql stdin")?;
    stdin.write_all(sql.as_bytes()).await?;
    drop(stdin);
    let output = child.wait_with_output().await?;
    anyhow::ensure!(output.status.success(), "psql failed");
    Ok(String::from_utf8(output.stdout)?)
}

async fn run_ok(command: &mut Command, dir: &Path) -> anyhow::Result<()> {
    let status = command.current_dir(dir).status().await?;
    anyhow::ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}
