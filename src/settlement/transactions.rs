//! Payment transactions, the settlement input: the request shape as received, the parsed
//! [`NewTransaction`] the store accepts, and the one statement that stores a whole batch.
//!
//! Parsing rejects everything the table's constraints would (so a client gets a 422 naming the
//! field instead of a 500), and a few things they cannot express (blank ids, NUL bytes).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;

use crate::http::error::ApiError;

/// Longest merchant id, in characters (the `merchant_id_length` constraint agrees).
pub const MAX_MERCHANT_ID_CHARS: usize = 255;

/// `POST /api/v1/transactions` element, as received.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransactionInput {
    /// 1 to 255 characters, not blank.
    pub merchant_id: String,
    /// Amount charged, in cents, ≥ 0.
    pub amount_cents: i64,
    /// Fee taken, in cents, 0 ≤ fee ≤ amount.
    pub fee_cents: i64,
    /// `PAID`, `PENDING`, `FAILED` or `REFUNDED`; only `PAID` is settled.
    pub status: String,
    /// RFC 3339 instant with an offset, e.g. `2025-01-31T23:59:59Z`.
    pub paid_at: String,
}

/// The state of a payment; only [`Status::Paid`] rows are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Paid,
    Pending,
    Failed,
    Refunded,
}

impl Status {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "PAID" => Self::Paid,
            "PENDING" => Self::Pending,
            "FAILED" => Self::Failed,
            "REFUNDED" => Self::Refunded,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paid => "PAID",
            Self::Pending => "PENDING",
            Self::Failed => "FAILED",
            Self::Refunded => "REFUNDED",
        }
    }
}

/// A transaction that passed validation: the store never sees anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransaction {
    pub merchant_id: String,
    pub amount_cents: i64,
    pub fee_cents: i64,
    pub status: Status,
    pub paid_at: DateTime<Utc>,
}

impl TransactionInput {
    /// Parses one element; `index` (its position in an array) is named in error messages.
    pub fn parse(self, index: Option<usize>) -> Result<NewTransaction, ApiError> {
        let at = index
            .map(|i| format!("transactions[{i}]: "))
            .unwrap_or_default();
        let chars = self.merchant_id.chars().count();
        if self.merchant_id.trim().is_empty()
            || chars > MAX_MERCHANT_ID_CHARS
            || self.merchant_id.chars().any(char::is_control)
        {
            return Err(ApiError::invalid(
                "INVALID_MERCHANT_ID",
                "merchant_id",
                format!(
                    "{at}merchant_id must be 1 to {MAX_MERCHANT_ID_CHARS} characters, \
                     not blank, without control characters"
                ),
            ));
        }
        if self.amount_cents < 0 {
            return Err(ApiError::invalid(
                "INVALID_AMOUNT",
                "amount_cents",
                format!("{at}amount_cents must not be negative"),
            ));
        }
        if !(0..=self.amount_cents).contains(&self.fee_cents) {
            return Err(ApiError::invalid(
                "INVALID_FEE",
                "fee_cents",
                format!("{at}fee_cents must be between 0 and amount_cents"),
            ));
        }
        let status = Status::parse(&self.status).ok_or_else(|| {
            ApiError::invalid(
                "INVALID_STATUS",
                "status",
                format!("{at}status must be one of PAID, PENDING, FAILED, REFUNDED"),
            )
        })?;
        let paid_at = DateTime::parse_from_rfc3339(&self.paid_at)
            .map_err(|_| {
                ApiError::invalid(
                    "INVALID_PAID_AT",
                    "paid_at",
                    format!("{at}paid_at must be an RFC 3339 timestamp with an offset"),
                )
            })?
            .with_timezone(&Utc);
        Ok(NewTransaction {
            merchant_id: self.merchant_id,
            amount_cents: self.amount_cents,
            fee_cents: self.fee_cents,
            status,
            paid_at,
        })
    }
}

/// A stored transaction.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Transaction {
    pub id: i64,
    pub merchant_id: String,
    pub amount_cents: i64,
    pub fee_cents: i64,
    pub status: String,
    pub paid_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Stores the whole batch in one statement (so all rows or none), ids in input order.
pub async fn insert_all(
    conn: &mut PgConnection,
    rows: &[NewTransaction],
) -> Result<Vec<Transaction>, sqlx::Error> {
    let merchants: Vec<&str> = rows.iter().map(|r| r.merchant_id.as_str()).collect();
    let amounts: Vec<i64> = rows.iter().map(|r| r.amount_cents).collect();
    let fees: Vec<i64> = rows.iter().map(|r| r.fee_cents).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    let paid: Vec<DateTime<Utc>> = rows.iter().map(|r| r.paid_at).collect();
    let mut stored: Vec<Transaction> = sqlx::query_as(
        "insert into transactions (merchant_id, amount_cents, fee_cents, status, paid_at)
         select m, a, f, s, p
         from unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::timestamptz[])
              with ordinality as t(m, a, f, s, p, n)
         order by n
         returning id, merchant_id, amount_cents, fee_cents, status, paid_at, created_at",
    )
    .bind(merchants)
    .bind(amounts)
    .bind(fees)
    .bind(statuses)
    .bind(paid)
    .fetch_all(conn)
    .await?;
    // Ids follow the input order (the insert is ordered by ordinality); sort so the response
    // does too whatever order RETURNING yields.
    stored.sort_by_key(|t| t.id);
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> TransactionInput {
        TransactionInput {
            merchant_id: "m-1".into(),
            amount_cents: 1000,
            fee_cents: 30,
            status: "PAID".into(),
            paid_at: "2025-01-01T00:00:00+09:00".into(),
        }
    }

    fn field_of(input: TransactionInput) -> &'static str {
        match input.parse(Some(3)) {
            Err(ApiError::Invalid { field, message, .. }) => {
                assert!(message.starts_with("transactions[3]"), "{message}");
                field
            }
            other => panic!("expected a 422, got {other:?}"),
        }
    }

    #[test]
    fn a_good_transaction_parses_to_utc() {
        let parsed = input().parse(None).unwrap();
        assert_eq!(parsed.paid_at.to_rfc3339(), "2024-12-31T15:00:00+00:00");
        assert_eq!(parsed.status, Status::Paid);
    }

    #[test]
    fn each_bad_field_is_named() {
        let bad = |f: fn(&mut TransactionInput)| {
            let mut i = input();
            f(&mut i);
            field_of(i)
        };
        assert_eq!(bad(|i| i.merchant_id = " ".into()), "merchant_id");
        assert_eq!(bad(|i| i.merchant_id = "x".repeat(256)), "merchant_id");
        assert_eq!(bad(|i| i.merchant_id = "a\0b".into()), "merchant_id");
        assert_eq!(bad(|i| i.amount_cents = -1), "amount_cents");
        assert_eq!(bad(|i| i.fee_cents = 1001), "fee_cents");
        assert_eq!(bad(|i| i.fee_cents = -1), "fee_cents");
        assert_eq!(bad(|i| i.status = "paid".into()), "status");
        assert_eq!(bad(|i| i.paid_at = "2025-01-01 00:00:00".into()), "paid_at");
        assert_eq!(
            bad(|i| i.paid_at = "2025-02-30T00:00:00Z".into()),
            "paid_at"
        );
    }
}
