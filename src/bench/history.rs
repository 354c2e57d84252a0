//! The seeded histories the settlement, replica and rescue benchmarks share: a database holding
//! N transactions from `settle seed`, reused across runs, and the late row `bench settlement
//! --late-row` adds.

use chrono::NaiveDate;
use sqlx::PgPool;

use super::process::Setup;
use crate::seed::{self, SeedArgs};
use crate::settlement::DateRange;

/// A settlement benchmark's setup on `database` (see [`Setup::on_database`]), its pool, holding
/// `seed`'s transactions (seeded unless exactly that many are there), and the range of all
/// their days.
pub(super) async fn seeded(
    setup: Setup,
    database: &str,
    seed: &SeedArgs,
) -> anyhow::Result<(Setup, PgPool, DateRange)> {
    let setup = setup.on_database(database)?;
    let pool = crate::cli::open(&setup.config, true).await?;
    ensure_seeded(&pool, seed).await?;
    let last_day = seed.start + chrono::Days::new(u64::from(seed.days) - 1);
    let range =
        DateRange::new(seed.start, last_day, i64::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((setup, pool, range))
}

/// [`SeedArgs`] of `transactions` over `days` and `merchants`, quietly.
pub(super) fn of(transactions: u64, days: u32, merchants: u32) -> SeedArgs {
    SeedArgs {
        transactions,
        days,
        merchants,
        quiet: true,
        ..SeedArgs::demo()
    }
}

/// Seeds `seed.transactions` rows unless exactly that many are already there.
pub(super) async fn ensure_seeded(pool: &PgPool, seed: &SeedArgs) -> anyhow::Result<()> {
    let present = sqlx::query_scalar!(r#"select count(*) as "count!" from transactions"#)
        .fetch_one(pool)
        .await?;
    if present == seed.transactions as i64 {
        println!("reusing {present} transactions");
        return Ok(());
    }
    sqlx::query!("truncate transactions").execute(pool).await?;
    let report = seed::run(pool, seed).await?;
    println!(
        "seeded {} transactions in {:.1} s",
        report.transactions, report.seconds
    );
    Ok(())
}

/// Moves the highest-id transaction into `day` at noon UTC, PAID: a transaction posted long
/// after it was paid, which stretches that day's id span over the rest of the table. The change
/// stays in the database.
pub(super) async fn post_last_row_late(pool: &PgPool, day: NaiveDate) -> anyhow::Result<()> {
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
