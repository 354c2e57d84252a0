//! Benchmarks: each drives settle the way users do and prints its figures next to the raw
//! Postgres rate of the same work measured in the same run, with the ratio. Each runs on a
//! database of its own, named `settle_bench*` ([`process::Setup::on_database`] refuses any other):
//! it may empty, reload or drop it.

mod drive;
mod history;
mod ingest;
mod orders;
pub mod process;
mod queue;
mod queue_deep;
mod queue_peers;
mod replica;
mod rescue;
mod seed;
mod settlement;

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Posts of 1,000 transactions through the HTTP API vs a bare multi-row INSERT of the same.
    Ingest(ingest::IngestArgs),
    /// Concurrent orders on one hot product through the HTTP API (unkeyed, keyed, a keyed
    /// sell-out) vs the same SQL without HTTP.
    Orders(orders::OrdersArgs),
    /// 100,000 no-op jobs through real worker processes vs graphile-worker and a pgbench
    /// claim-and-complete loop; `--deep` for the deep-queue phases.
    Queue(queue::QueueArgs),
    /// Primary CPU of a settlement reading its batches on the primary vs on a hot standby.
    Replica(replica::ReplicaBenchArgs),
    /// A settlement's holder SIGKILLed again and again while another worker waits: time until
    /// the job is claimed again and progresses, and the result checked exact.
    Rescue(rescue::RescueArgs),
    /// `settle seed`'s COPY load vs a bare INSERT … SELECT generate_series of the same rows.
    Seed(seed::SeedBenchArgs),
    /// One settlement job through api + worker processes vs the single equivalent statement.
    Settlement(settlement::SettlementBenchArgs),
}

/// Runs `command` with `config`, loaded from `config_file` (if any) and the environment; the
/// benchmark's child processes load the same file.
pub async fn run(
    command: BenchCommand,
    config: Config,
    config_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let setup = process::Setup::new(config, config_file);
    match command {
        BenchCommand::Ingest(args) => ingest::run(args, setup).await,
        BenchCommand::Orders(args) => orders::run(args, setup).await,
        BenchCommand::Queue(args) => queue::run(args, setup).await,
        BenchCommand::Replica(args) => replica::run(args, setup).await,
        BenchCommand::Rescue(args) => rescue::run(args, setup).await,
        BenchCommand::Seed(args) => seed::run(args, setup).await,
        BenchCommand::Settlement(args) => settlement::run(args, setup).await,
    }
}

/// The median of `values`: the middle one, or the mean of the two middle ones of an even
/// count; `None` when there are none.
fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[middle]),
        _ => Some((values[middle - 1] + values[middle]) / 2.0),
    }
}

/// A count of things a benchmark runs (jobs, workers, rounds), refused at 0: no benchmark
/// measures anything with none, and some would wait forever.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

/// A file of this benchmark run in the temporary directory, removed when dropped: a run that
/// fails leaves none behind either.
struct TempFile(PathBuf);

impl TempFile {
    /// `settle-<name>-<pid>.<extension>`, so that runs beside each other do not share one.
    fn new(name: &str, extension: &str) -> Self {
        let file = format!("settle-{name}-{}.{extension}", std::process::id());
        Self(std::env::temp_dir().join(file))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median([]), None);
        assert_eq!(median([3.0]), Some(3.0));
        assert_eq!(median([5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median([4.0, 1.0, 2.0, 10.0]), Some(3.0));
    }
}
