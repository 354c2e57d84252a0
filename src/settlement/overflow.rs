//! What a job's overflow is of ([`super::SettleError::Overflow`]): the merchant-days whose sums
//! leave 64 bits, for the job's recorded error. The statement whose cast failed (a batch's sums,
//! a part's fold, the finalize's correction or replace) is aborted and says nothing of the row
//! it was on, and one row past the range may be no single transaction's: two rows of 2^62 each
//! fit, their sum does not. So once that statement's transaction is rolled back, a second look
//! sums the job's input in `numeric`, merchant-day by merchant-day, and names those outside the
//! range, the first [`LISTED`] of them. It runs only on that failure path, one pass over the
//! range's rows.

use chrono::NaiveDate;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use super::SettleError;
use super::input::paid_within;
use super::plan::Plan;

/// The merchant-days a job's error names; the rest are counted.
pub const LISTED: i64 = 3;

/// A merchant-day of the input whose sums do not all fit in 64 bits.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Overflowing {
    pub merchant_id: String,
    pub date: NaiveDate,
    /// The columns of `settlements` that cannot hold it (`gross_cents`, `fee_cents`,
    /// `net_cents`; a `txn_count` always fits, the input having fewer rows than 2^63).
    pub sums: Vec<String>,
    /// How many merchant-days of the input overflow in all, the same on every row.
    pub found: i64,
}

/// The input's merchant-days whose sums leave 64 bits, in `(merchant_id, date)` order, at most
/// `limit` of them, each with the count of all. The input is counted exactly as the job counts
/// it: its rows up to the run's high-water id, PAID, whose `paid_at` falls on one of the run's
/// days in the run's zone (the days' time bound, [`paid_within`], lets the `(paid_at, id)`
/// index find them), as the table holds them now, which is what the job publishes (its
/// finalize corrects its batches by the changes they did not see). `net_cents` is
/// `gross_cents - fee_cents` of the exact sums.
pub async fn find(
    conn: &mut PgConnection,
    plan: &Plan,
    limit: i64,
) -> Result<Vec<Overflowing>, sqlx::Error> {
    let zone = plan.zone();
    let day = zone.day_sql();
    let outside = |sum: &str, column: &str| {
        format!("case when {sum} not between $4 and $5 then '{column}' end")
    };
    // Dynamic: the days hold the run's zone as a literal (see `Zone::day_sql`).
    sqlx::query_as(AssertSqlSafe(format!(
        "with sums as (
             select merchant_id, {day} as date, sum(amount_cents) as gross,
                    sum(fee_cents) as fee
             from transactions
             where id <= $1 and {within} and status = 'PAID' and {day} between $2 and $3
             group by merchant_id, {day}
         ), outside as (
             select merchant_id, date, array_remove(array[{gross}, {fee}, {net}], null) as sums
             from sums
         )
         select merchant_id, date, sums, count(*) over () as found
         from outside where cardinality(sums) > 0
         order by merchant_id, date
         limit $6",
        within = paid_within(zone, "$2", "$3"),
        gross = outside("gross", "gross_cents"),
        fee = outside("fee", "fee_cents"),
        net = outside("gross - fee", "net_cents"),
    )))
    .bind(plan.run.high_water_id)
    .bind(plan.run.from_date)
    .bind(plan.run.to_date)
    .bind(i64::MIN)
    .bind(i64::MAX)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The job's error for an overflow of `found` ([`find`]'s answer): the overflow, and the
/// merchant-days, with the sums of each that do not fit. None found (the rows changed between
/// the failed statement and the look) is said too.
pub fn message(found: &[Overflowing]) -> String {
    let overflow = SettleError::Overflow;
    let Some(first) = found.first() else {
        return format!(
            "{overflow} (no merchant-day of the input exceeds it now: its rows changed since)"
        );
    };
    let named: Vec<String> = found
        .iter()
        .map(|day| {
            format!(
                "merchant {:?} on {} ({})",
                day.merchant_id,
                day.date,
                day.sums.join(", ")
            )
        })
        .collect();
    let more = first.found - found.len() as i64;
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("{overflow}: {}{more}", named.join(", "))
}

/// The job's error for an overflow ([`message`]), found on a connection of its own: call it
/// once the transaction whose statement overflowed is rolled back, which holds a connection
/// the look may wait for. Where the look itself fails, the plain overflow and that failure.
pub async fn describe(pool: &PgPool, plan: &Plan) -> String {
    let found = async { find(&mut *pool.acquire().await?, plan, LISTED).await };
    match found.await {
        Ok(found) => message(&found),
        Err(e) => {
            tracing::warn!(job = plan.run.job_id, error = %e,
                "finding the merchant-days whose settlement sums overflow failed");
            format!(
                "{} (finding its merchant-days failed: {e})",
                SettleError::Overflow
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overflowing(merchant_id: &str, date: &str, sums: &[&str], found: i64) -> Overflowing {
        Overflowing {
            merchant_id: merchant_id.to_owned(),
            date: date.parse().unwrap(),
            sums: sums.iter().map(|&s| s.to_owned()).collect(),
            found,
        }
    }

    #[test]
    fn the_message_names_merchant_days_and_sums() {
        let one = [overflowing("m", "2025-01-01", &["gross_cents"], 1)];
        assert_eq!(
            message(&one),
            "a settlement sum exceeds the 64-bit range: merchant \"m\" on 2025-01-01 \
             (gross_cents)"
        );
        let many = [
            overflowing("a\"b", "2025-01-01", &["gross_cents", "net_cents"], 5),
            overflowing("c", "2025-01-02", &["gross_cents", "fee_cents"], 5),
        ];
        assert_eq!(
            message(&many),
            "a settlement sum exceeds the 64-bit range: merchant \"a\\\"b\" on 2025-01-01 \
             (gross_cents, net_cents), merchant \"c\" on 2025-01-02 (gross_cents, fee_cents) \
             and 3 more"
        );
        assert!(message(&[]).contains("changed since"), "{}", message(&[]));
    }
}
