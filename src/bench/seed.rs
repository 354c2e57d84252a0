//! `settle bench seed`: `settle seed`'s COPY load against a bare `INSERT … SELECT
//! generate_series` of the same number of rows of the same shape (days, merchants, status mix,
//! amounts, ids in `paid_at` order), in the same database, run.

use std::time::Instant;

use clap::Args;

use super::process::Setup;
use crate::seed;

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
    // What both sides load, and the header says.
    let rows = super::history::of(args.transactions, 30, 1_000);
    println!(
        "settle bench seed: {} transactions over {} days from {}, {} merchants, database {}",
        rows.transactions, rows.days, rows.start, rows.merchants, args.database
    );
    let seeded = seed::run(&pool, &rows).await?;
    println!(
        "seed   {:>7.2} s  {:>10.0} rows/s  (binary COPY on {} connections, then VACUUM ANALYZE)",
        seeded.seconds,
        args.transactions as f64 / seeded.seconds,
        rows.connections
    );
    sqlx::query!("truncate transactions").execute(&pool).await?;
    let started = Instant::now();
    // `settle seed`'s rows made by arithmetic instead of its generator: the same merchants,
    // amounts and fees, its status mix (`seed::STATUSES`: 90 % PAID, 4 PENDING, 4 FAILED,
    // 2 REFUNDED), and `paid_at` spread over the days in id order, as its feed arrives.
    let start = rows
        .start
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    sqlx::query!(
        "insert into transactions
             (id, merchant_id, external_id, amount_cents, fee_cents, status, paid_at)
         select g, 'm' || lpad((g % $2::int)::text, 5, '0'), 'ch_' || lpad(g::text, 12, '0'),
                100 + g % 99900,
                least(100 + g % 99900, (100 + g % 99900) * 29 / 1000 + 30),
                case when g % 100 < 90 then 'PAID' when g % 100 < 94 then 'PENDING'
                     when g % 100 < 98 then 'FAILED' else 'REFUNDED' end,
                $3::timestamptz
                    + make_interval(secs => ((g - 1) * 86400 * $4::int)::float8 / $1::bigint)
         from generate_series(1, $1::bigint) g",
        rows.transactions as i64,
        rows.merchants as i32,
        start,
        rows.days as i32,
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
