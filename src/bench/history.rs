//! The seeded histories the settlement, replica and rescue benchmarks share: a database holding
//! transactions from `settle seed`, and the late row `bench settlement --late-row` adds, reused
//! across runs that ask for the same. What was loaded is recorded with the rows, as the
//! comment on `transactions`, so that a run asking for other rows loads them.

use chrono::NaiveDate;
use sqlx::{AssertSqlSafe, PgPool};

use super::process::Setup;
use crate::seed::{self, SeedArgs};
use crate::settlement::DateRange;

/// A settlement benchmark's setup on `database` (see [`Setup::on_database`]), its pool, holding
/// `seed`'s transactions with the last one moved into `late_row` if given (see
/// [`post_last_row_late`]), and the range of all their days.
pub(super) async fn seeded(
    setup: Setup,
    database: &str,
    seed: &SeedArgs,
    late_row: Option<NaiveDate>,
) -> anyhow::Result<(Setup, PgPool, DateRange)> {
    let setup = setup.on_database(database)?;
    let pool = crate::cli::open(&setup.config, true).await?;
    ensure_seeded(&pool, seed, late_row).await?;
    let last_day = seed.start + chrono::Days::new(u64::from(seed.days) - 1);
    let range =
        DateRange::new(seed.start, last_day, i64::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((setup, pool, range))
}

/// [`SeedArgs`] of `transactions` over `days` from 2025-01-01 and `merchants`, quietly, and no
/// products: every argument spelt out, so that no other command's defaults move the benchmarks'
/// data.
pub(super) fn of(transactions: u64, days: u32, merchants: u32) -> SeedArgs {
    SeedArgs {
        products: 0,
        transactions,
        days,
        merchants,
        start: NaiveDate::from_ymd_opt(2025, 1, 1).expect("valid date"),
        seed: 42,
        connections: 2,
        quiet: true,
    }
}

/// Reuses the transactions if their record says they are `seed`'s (moved by `late_row`);
/// otherwise empties the table, loads them and records so.
async fn ensure_seeded(
    pool: &PgPool,
    seed: &SeedArgs,
    late_row: Option<NaiveDate>,
) -> anyhow::Result<()> {
    let wanted = record(seed, late_row);
    let found = sqlx::query_scalar!(
        r#"select obj_description('transactions'::regclass, 'pg_class') as "record""#
    )
    .fetch_one(pool)
    .await?;
    if found.as_deref() == Some(wanted.as_str()) {
        println!("reusing the transactions of {wanted}");
        return Ok(());
    }
    println!(
        "seeding: the table held {}",
        found.as_deref().unwrap_or("no recorded transactions")
    );
    // The record goes with the old rows: a load cut short leaves none, so the next run loads
    // again.
    let mut tx = pool.begin().await?;
    sqlx::query!("comment on table transactions is null")
        .execute(&mut *tx)
        .await?;
    sqlx::query!("truncate transactions")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let report = seed::run(pool, seed).await?;
    println!(
        "seeded {} transactions in {:.1} s",
        report.transactions, report.seconds
    );
    if let Some(day) = late_row {
        post_last_row_late(pool, day).await?;
    }
    // Dynamic: COMMENT takes a literal, not a parameter; the record holds no quote.
    sqlx::query(AssertSqlSafe(format!(
        "comment on table transactions is '{wanted}'"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// What [`ensure_seeded`] loads, as the table's comment records it: every argument that
/// decides the rows (`--connections` does not).
fn record(seed: &SeedArgs, late_row: Option<NaiveDate>) -> String {
    let SeedArgs {
        transactions,
        days,
        merchants,
        start,
        seed,
        ..
    } = seed;
    let mut record = format!(
        "settle seed --transactions {transactions} --days {days} --merchants {merchants} \
         --start {start} --seed {seed}"
    );
    if let Some(day) = late_row {
        record += &format!(", then the last row moved into {day} (--late-row)");
    }
    record
}

/// Moves the highest-id transaction into `day` at noon UTC, PAID: a transaction posted long
/// after it was paid, which stretches that day's id span over the rest of the table.
async fn post_last_row_late(pool: &PgPool, day: NaiveDate) -> anyhow::Result<()> {
    let noon = day.and_hms_opt(12, 0, 0).expect("noon exists").and_utc();
    let moved = sqlx::query!(
        "update transactions set paid_at = $1, status = 'PAID'
         where id = (select max(id) from transactions)",
        noon,
    )
    .execute(pool)
    .await?;
    println!(
        "moved {} transaction(s) into {day} at noon (--late-row)",
        moved.rows_affected()
    );
    Ok(())
}
