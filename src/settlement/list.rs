//! Reading the `settlements` table in keyset pages, in `(merchant_id, date)` order: the order
//! of its unique key, so a page is an index range scan however large the table grows.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;

/// One merchant-day as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SettlementRow {
    pub merchant_id: String,
    pub date: NaiveDate,
    pub gross_cents: i64,
    pub fee_cents: i64,
    pub net_cents: i64,
    pub txn_count: i64,
    pub generated_at: DateTime<Utc>,
    /// The job whose completion wrote the row.
    pub job_id: i64,
}

/// Which rows, and where the page starts.
#[derive(Debug, Clone, Default)]
pub struct SettlementFilter {
    pub merchant_id: Option<String>,
    /// First day, inclusive.
    pub from: Option<NaiveDate>,
    /// Last day, inclusive.
    pub to: Option<NaiveDate>,
    /// The last row of the previous page: this page starts strictly after it.
    pub after: Option<(String, NaiveDate)>,
}

/// Up to `limit` rows matching `filter`, in `(merchant_id, date)` order (merchant ids bytewise,
/// the column's collation).
pub async fn list(
    conn: &mut PgConnection,
    filter: &SettlementFilter,
    limit: i64,
) -> Result<Vec<SettlementRow>, sqlx::Error> {
    let (after_merchant, after_date) = filter.after.clone().unzip();
    sqlx::query_as!(
        SettlementRow,
        "select merchant_id, date, gross_cents, fee_cents, net_cents, txn_count, generated_at,
                job_id
         from settlements
         where ($1::text is null or merchant_id = $1)
           and ($2::date is null or date >= $2)
           and ($3::date is null or date <= $3)
           and ($4::text is null or (merchant_id, date) > ($4, $5::date))
         order by merchant_id, date
         limit $6",
        filter.merchant_id.as_deref(),
        filter.from,
        filter.to,
        after_merchant,
        after_date,
        limit,
    )
    .fetch_all(conn)
    .await
}
