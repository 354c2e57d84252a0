//! `settle bench seed`: `settle seed`'s COPY load against a bare `INSERT … SELECT
//! generate_series` of the same number of rows of the same shape, in the same database, run.

use std::time::Instant;

use clap::Args;

use super::process::Setup;
use crate::seed::{self, SeedArgs};

#[derive(Debug, Args)]
pub struct SeedBenchArgs {
    /// Transactions each side loads.
    #[arg(long, default_value_t = 10_000_000)]
    pub transactions: u64,
    /// Database the benchmark owns, named settle_bench*: dropped and recreated at each run.
    #[arg(long, default_value = "settle_bench_seed")]
    pub database: String,
}

pub async fn run(args: SeedBenchArgs, setup: Setup) -> anyhow::Result<()> {
    let setup = setup.on_database(&args.database)?;
    let config = &setup.config;
    super::process::recreate_database(config).await?;
    let pool = crate::cli::open(config, true).await?;
    println!(
        "settle bench seed: {} transactions, 30 days, 1,000 merchants, database {}",
        args.transactions, args.database
    );
    let seeded = seed::run(
        &pool,
        &SeedArgs {
            transactions: args.transactions,
            quiet: true,
            ..SeedArgs::demo()
        },
    )
    .await?;
    println!(
        "seed   {:>7.2} s  {:>10.0} rows/s  (binary COPY on 2 connections, then VACUUM ANALYZE)",
        seeded.seconds,
        args.transactions as f64 / seeded.seconds
    );
    sqlx::query!("truncate transactions").execute(&pool).await?;
    let started = Instant::now();
    sqlx::query!(
        "insert into transactions
             (id, merchant_id, external_id, amount_cents, fee_cents, status, paid_at)
         select g, 'm' || lpad((g % 1000)::text, 5, '0'), 'ch_' || lpad(g::text, 12, '0'),
                100 + g % 99900,
                least(100 + g % 99900, (100 + g % 99900) * 29 / 1000 + 30),
                case when g % 10 = 0 then 'PENDING' else 'PAID' end,
                timestamptz '2025-01-01' + (g % 2592000) * interval '1 second'
         from generate_series(1, $1::bigint) g",
        args.transactions as i64,
    )
    .execute(&pool)
    .await?;
    sqlx::query!("vacuum (analyze) transactions")
        .execute(&pool)
        .await?;
    let raw = started.elapsed().as_secs_f64();
    println!(
        "raw    {raw:>7.2} s  {:>10.0} rows/s  (one INSERT … SELECT generate_series, then VACUUM ANALYZE)",
        args.transactions as f64 / raw
    );
    println!(
        "ratio  seed / raw time = {:.2}  (target <= 1.30)",
        seeded.seconds / raw
    );
    pool.close().await;
    Ok(())
}
