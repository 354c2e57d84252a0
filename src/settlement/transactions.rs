//! Payment transactions, the settlement input: the fields as received ([`RawTransaction`]), the
//! parsed [`NewTransaction`] the store accepts, and [`ingest`], which stores a batch exactly once.
//!
//! A transaction's identity is `(merchant_id, external_id)`, the payment provider's charge id
//! (constraint `transactions_merchant_external_id_key`): a re-sent transaction with the same
//! fields is a duplicate and stores nothing; with any field different it is a conflict and the
//! whole request stores nothing.
//!
//! Parsing rejects everything the table's constraints would (so a client is told the field at
//! fault instead of meeting a database error), and a few things they cannot express (blank ids,
//! NUL bytes).

use chrono::{DateTime, NaiveDate, Timelike, Utc};
use sqlx::PgConnection;

/// Longest merchant id, in characters (the `merchant_id_length` constraint agrees).
pub const MAX_MERCHANT_ID_CHARS: usize = 255;

/// Longest external id, in characters (the `transaction_external_id_format` constraint agrees).
pub const MAX_EXTERNAL_ID_CHARS: usize = 128;

/// One transaction's fields as received, not yet checked.
#[derive(Debug, Clone)]
pub struct RawTransaction {
    pub merchant_id: String,
    pub external_id: String,
    pub amount_cents: i64,
    pub fee_cents: i64,
    pub status: String,
    pub paid_at: String,
}

/// A field of a transaction, each with one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    MerchantId,
    ExternalId,
    Amount,
    Fee,
    Status,
    PaidAt,
}

impl Field {
    /// The field's name as received.
    pub fn name(self) -> &'static str {
        match self {
            Self::MerchantId => "merchant_id",
            Self::ExternalId => "external_id",
            Self::Amount => "amount_cents",
            Self::Fee => "fee_cents",
            Self::Status => "status",
            Self::PaidAt => "paid_at",
        }
    }

    /// What a value of this field must be.
    fn rule(self) -> String {
        match self {
            Self::MerchantId => format!(
                "be 1 to {MAX_MERCHANT_ID_CHARS} characters, not blank, without control characters"
            ),
            Self::ExternalId => {
                format!("be 1 to {MAX_EXTERNAL_ID_CHARS} visible ASCII characters")
            }
            Self::Amount => "not be negative".into(),
            Self::Fee => "be between 0 and amount_cents".into(),
            Self::Status => "be one of PAID, PENDING, FAILED, REFUNDED".into(),
            Self::PaidAt => {
                "be an RFC 3339 date-time (a T between day and time) with an offset, from \
                 0001-01-02 to 9999-12-30 (UTC)"
                    .into()
            }
        }
    }
}

/// A transaction that breaks its field's rule; `index` is its position in a batch, if it came
/// in one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{} must {}", at(*.index), .field.name(), .field.rule())]
pub struct InvalidTransaction {
    pub index: Option<usize>,
    pub field: Field,
}

/// `transactions[i]: `, naming an element of a batch in a message.
fn at(index: Option<usize>) -> String {
    index
        .map(|i| format!("transactions[{i}]: "))
        .unwrap_or_default()
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
    pub external_id: String,
    pub amount_cents: i64,
    pub fee_cents: i64,
    pub status: Status,
    pub paid_at: DateTime<Utc>,
}

impl RawTransaction {
    /// Parses one transaction; `index` (its position in a batch) is kept in the error.
    pub fn parse(self, index: Option<usize>) -> Result<NewTransaction, InvalidTransaction> {
        let invalid = |field| InvalidTransaction { index, field };
        let chars = self.merchant_id.chars().count();
        if self.merchant_id.trim().is_empty()
            || chars > MAX_MERCHANT_ID_CHARS
            || self.merchant_id.chars().any(char::is_control)
        {
            return Err(invalid(Field::MerchantId));
        }
        let external = &self.external_id;
        if external.is_empty()
            || external.len() > MAX_EXTERNAL_ID_CHARS
            || !external.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(Field::ExternalId));
        }
        if self.amount_cents < 0 {
            return Err(invalid(Field::Amount));
        }
        if !(0..=self.amount_cents).contains(&self.fee_cents) {
            return Err(invalid(Field::Fee));
        }
        let status = Status::parse(&self.status).ok_or(invalid(Field::Status))?;
        let paid_at = parse_paid_at(&self.paid_at).ok_or(invalid(Field::PaidAt))?;
        Ok(NewTransaction {
            merchant_id: self.merchant_id,
            external_id: self.external_id,
            amount_cents: self.amount_cents,
            fee_cents: self.fee_cents,
            status,
            paid_at,
        })
    }
}

/// An RFC 3339 `date-time` (the grammar of its section 5.6, which the document's `format:
/// date-time` names) in [`paid_at_in_range`], as the column keeps it. chrono's parser also
/// takes a space for the `T` and U+2212 for an offset's minus; the grammar takes neither.
fn parse_paid_at(raw: &str) -> Option<DateTime<Utc>> {
    let separator = matches!(raw.as_bytes().get(10), Some(b'T' | b't'));
    let paid_at = DateTime::parse_from_rfc3339(raw)
        .ok()
        .filter(|_| separator && raw.is_ascii())?
        .with_timezone(&Utc);
    // chrono takes a second 60 in any minute at any offset (a second run of the nanoseconds);
    // a leap second is only ever the last of a UTC day.
    let leap = paid_at.nanosecond() >= 1_000_000_000;
    if leap && (paid_at.hour(), paid_at.minute()) != (23, 59) {
        return None;
    }
    paid_at_in_range(paid_at).then(|| to_microseconds(paid_at))
}

/// Whether `paid_at` is a day away from the years 1 and 9999 (UTC), as the table's check
/// (migration 0017) holds every writer to: its day in any zone is then a day of years 1 to
/// 9999, one a CSV writes as `YYYY-MM-DD` (Postgres writes year 0 as `0001 BC`) and a zone's
/// statistics can compute (`ANALYZE` fails on an instant whose local time leaves the
/// timestamp range).
fn paid_at_in_range(paid_at: DateTime<Utc>) -> bool {
    let day = paid_at.date_naive();
    let first = NaiveDate::from_ymd_opt(1, 1, 2).expect("a day");
    let last = NaiveDate::from_ymd_opt(9999, 12, 30).expect("a day");
    (first..=last).contains(&day)
}

/// `instant` as the column keeps it, to the microsecond, on its own day: finer digits are
/// dropped toward the past (sqlx would cut them toward 2000-01-01, moving an instant in the
/// last microsecond before that into the next day), and a leap second (`23:59:60`, which
/// chrono reads as a second run of the nanoseconds) is the last microsecond of its minute,
/// where Postgres would roll it over into the next.
fn to_microseconds(instant: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = instant.nanosecond().min(999_999_999);
    instant
        .with_nanosecond(nanos - nanos % 1_000)
        .expect("a nanosecond within the second")
}

/// A batch as the parallel arrays both of [`ingest`]'s statements unnest, in their `$1`..`$6`
/// (bound by [`with_columns!`]).
struct Columns<'a> {
    merchants: Vec<&'a str>,
    externals: Vec<&'a str>,
    amounts: Vec<i64>,
    fees: Vec<i64>,
    statuses: Vec<&'static str>,
    paid: Vec<DateTime<Utc>>,
}

impl<'a> Columns<'a> {
    fn of(rows: &'a [NewTransaction]) -> Self {
        Self {
            merchants: rows.iter().map(|r| r.merchant_id.as_str()).collect(),
            externals: rows.iter().map(|r| r.external_id.as_str()).collect(),
            amounts: rows.iter().map(|r| r.amount_cents).collect(),
            fees: rows.iter().map(|r| r.fee_cents).collect(),
            statuses: rows.iter().map(|r| r.status.as_str()).collect(),
            paid: rows.iter().map(|r| r.paid_at).collect(),
        }
    }
}

/// `sqlx::$macro!($sql, <the columns' six arrays>)`: a checked statement over a [`Columns`].
macro_rules! with_columns {
    ($macro:ident!($sql:literal, $columns:expr)) => {
        sqlx::$macro!(
            $sql,
            &$columns.merchants as &[&str],
            &$columns.externals as &[&str],
            &$columns.amounts,
            &$columns.fees,
            &$columns.statuses as &[&str],
            &$columns.paid,
        )
    };
}

/// What [`ingest`] did with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Every element was stored or was an exact duplicate of a stored transaction.
    Stored { inserted: u64, duplicates: u64 },
    /// The element at `index` has the identity of a stored transaction (or of an earlier
    /// element) with different fields. The caller must roll back: nothing may be stored.
    Conflict {
        index: usize,
        merchant_id: String,
        external_id: String,
        /// The first element before `index` with the same identity, if the batch repeats it:
        /// the batch then holds two different transactions under it, whatever was stored.
        earlier: Option<usize>,
    },
}

/// Stores the batch's new transactions in `tx` and tells which were duplicates, or finds the
/// first conflict (then the caller rolls `tx` back). Two statements at most: the insert, and
/// only when some element was not inserted, one indexed comparison of the batch against what
/// is stored. Rows are inserted in identity order, so concurrent batches sharing identities
/// take their index locks in the same order and cannot deadlock; a concurrent batch's
/// uncommitted row is waited for, then counted as stored. An identity repeated in the batch is
/// inserted from its first element (the sort alone is not stable), so a later one that differs
/// is the element named.
pub async fn ingest(
    tx: &mut PgConnection,
    rows: &[NewTransaction],
) -> Result<Ingested, sqlx::Error> {
    let columns = Columns::of(rows);
    let inserted = with_columns!(query!(
        "insert into transactions
             (merchant_id, external_id, amount_cents, fee_cents, status, paid_at)
         select m, e, a, f, s, p
         from unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[],
                     $6::timestamptz[]) with ordinality as t(m, e, a, f, s, p, n)
         order by m, e, n
         on conflict on constraint transactions_merchant_external_id_key do nothing",
        columns
    ))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let total = rows.len() as u64;
    if inserted < total {
        // Each element against the row stored under its identity (this batch's own first
        // occurrence included): any field that differs is a conflict.
        let conflict = with_columns!(query_scalar!(
            r#"select t.n as "n!" from unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[],
                                    $6::timestamptz[]) with ordinality as t(m, e, a, f, s, p, n)
             join transactions x on x.merchant_id = t.m and x.external_id = t.e
             where (x.amount_cents, x.fee_cents, x.status, x.paid_at)
                   is distinct from (t.a, t.f, t.s, t.p)
             order by t.n
             limit 1"#,
            columns
        ))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(n) = conflict {
            let index = (n - 1) as usize;
            let (merchant_id, external_id) = (&rows[index].merchant_id, &rows[index].external_id);
            let earlier = rows[..index]
                .iter()
                .position(|r| (&r.merchant_id, &r.external_id) == (merchant_id, external_id));
            return Ok(Ingested::Conflict {
                index,
                merchant_id: merchant_id.clone(),
                external_id: external_id.clone(),
                earlier,
            });
        }
    }
    Ok(Ingested::Stored {
        inserted,
        duplicates: total - inserted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> RawTransaction {
        RawTransaction {
            merchant_id: "m-1".into(),
            external_id: "ch_1".into(),
            amount_cents: 1000,
            fee_cents: 30,
            status: "PAID".into(),
            paid_at: "2025-01-01T00:00:00+09:00".into(),
        }
    }

    fn field_of(input: RawTransaction) -> &'static str {
        match input.parse(Some(3)) {
            Err(e) => {
                let message = e.to_string();
                assert!(message.starts_with("transactions[3]"), "{message}");
                e.field.name()
            }
            other => panic!("expected an invalid transaction, got {other:?}"),
        }
    }

    #[test]
    fn a_good_transaction_parses_to_utc() {
        let parsed = input().parse(None).unwrap();
        assert_eq!(parsed.paid_at.to_rfc3339(), "2024-12-31T15:00:00+00:00");
        assert_eq!(parsed.status, Status::Paid);
    }

    #[test]
    fn paid_at_drops_what_is_finer_than_a_microsecond_toward_the_past() {
        let kept = |paid_at: &str| {
            let raw = RawTransaction {
                paid_at: paid_at.into(),
                ..input()
            };
            raw.parse(None).unwrap().paid_at.to_rfc3339()
        };
        assert_eq!(
            kept("1999-12-31T23:59:59.9999999Z"),
            "1999-12-31T23:59:59.999999+00:00"
        );
        assert_eq!(
            kept("2016-12-31T23:59:60.5Z"),
            "2016-12-31T23:59:59.999999+00:00"
        );
        assert_eq!(
            kept("2025-01-01T09:00:00.123456789+09:00"),
            "2025-01-01T00:00:00.123456+00:00"
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let bad = |f: fn(&mut RawTransaction)| {
            let mut i = input();
            f(&mut i);
            field_of(i)
        };
        assert_eq!(bad(|i| i.merchant_id = " ".into()), "merchant_id");
        assert_eq!(bad(|i| i.merchant_id = "x".repeat(256)), "merchant_id");
        assert_eq!(bad(|i| i.merchant_id = "a\0b".into()), "merchant_id");
        assert_eq!(bad(|i| i.external_id = String::new()), "external_id");
        assert_eq!(bad(|i| i.external_id = "x".repeat(129)), "external_id");
        assert_eq!(bad(|i| i.external_id = "ch 1".into()), "external_id");
        assert_eq!(bad(|i| i.external_id = "ch_é".into()), "external_id");
        assert_eq!(bad(|i| i.amount_cents = -1), "amount_cents");
        assert_eq!(bad(|i| i.fee_cents = 1001), "fee_cents");
        assert_eq!(bad(|i| i.fee_cents = -1), "fee_cents");
        assert_eq!(bad(|i| i.status = "paid".into()), "status");
        assert_eq!(bad(|i| i.paid_at = "2025-01-01 00:00:00".into()), "paid_at");
        // What chrono takes beyond RFC 3339's grammar: a space for the T, a Unicode minus.
        assert_eq!(
            bad(|i| i.paid_at = "2025-01-15 12:00:00Z".into()),
            "paid_at"
        );
        assert_eq!(
            bad(|i| i.paid_at = "2025-01-15T12:00:00\u{2212}05:00".into()),
            "paid_at"
        );
        assert_eq!(
            bad(|i| i.paid_at = "2025-02-30T00:00:00Z".into()),
            "paid_at"
        );
        let paid_at = |at: &str| {
            let mut raw = input();
            raw.paid_at = at.into();
            raw.parse(None).map(|_| ()).map_err(|e| e.field.name())
        };
        for out_of_range in [
            "0000-06-01T12:00:00Z",
            "0001-01-02T08:59:59+09:00",
            "9999-12-31T00:00:00Z",
        ] {
            assert_eq!(paid_at(out_of_range), Err("paid_at"), "{out_of_range}");
        }
        // A second 60 is a leap second only at the end of a UTC day.
        for not_leap in ["2025-01-15T12:30:60Z", "2016-12-31T23:59:60+01:00"] {
            assert_eq!(paid_at(not_leap), Err("paid_at"), "{not_leap}");
        }
        for edge in [
            "0001-01-02T00:00:00Z",
            "9999-12-30T23:59:59.999999Z",
            "2025-01-15t12:00:00z",
            "2016-12-31T23:59:60Z",
            "2017-01-01T00:59:60+01:00",
        ] {
            assert_eq!(paid_at(edge), Ok(()), "{edge}");
        }
    }
}
