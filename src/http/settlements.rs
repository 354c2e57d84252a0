//! `GET /api/v1/settlements`: the `settlements` table in keyset pages, `(merchant_id, date)`
//! order. An admin reads every merchant; a merchant token reads its own rows only, and asking
//! for another merchant's answers an empty page, exactly as for a merchant with no
//! settlements, so a merchant learns nothing of which other merchants exist.

use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Router};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::ApiError;
use super::extract::{Json, ListQuery};
use super::openapi::ErrorBody;
use super::pagination::{self, Page, PageQuery, text_filter};
use crate::settlement;
use crate::settlement::list::{self, SettlementFilter, SettlementRow};
use crate::tokens::{Principal, Role};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/settlements", get(list_settlements))
}

/// One merchant-day: the CSV's row, plus when and by which job it was built.
#[derive(Debug, Serialize, ToSchema)]
pub struct Settlement {
    merchant_id: String,
    /// The calendar day, `YYYY-MM-DD`, in `settlement.time_zone`.
    date: NaiveDate,
    gross_cents: i64,
    fee_cents: i64,
    /// `gross_cents - fee_cents`.
    net_cents: i64,
    txn_count: i64,
    generated_at: DateTime<Utc>,
    job_id: i64,
}

impl From<SettlementRow> for Settlement {
    fn from(r: SettlementRow) -> Self {
        Self {
            merchant_id: r.merchant_id,
            date: r.date,
            gross_cents: r.gross_cents,
            fee_cents: r.fee_cents,
            net_cents: r.net_cents,
            txn_count: r.txn_count,
            generated_at: r.generated_at,
            job_id: r.job_id,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListSettlementsQuery {
    /// Only this merchant's rows (a merchant token reads only its own anyway).
    #[param(min_length = 1)]
    merchant_id: Option<String>,
    /// First day, `YYYY-MM-DD`, inclusive, of the years 0001 to 9999 (422 `INVALID_DATE` for
    /// year 0000).
    #[param(pattern = r"^\d{4}-\d{2}-\d{2}$")]
    from: Option<String>,
    /// Last day, `YYYY-MM-DD`, inclusive, of the years 0001 to 9999; not before `from`.
    #[param(pattern = r"^\d{4}-\d{2}-\d{2}$")]
    to: Option<String>,
}

/// Settlements in `(merchant_id, date)` order. A merchant token sees its own rows only; asking
/// for another `merchant_id` answers an empty page, as if that merchant had none.
#[utoipa::path(
    get, path = "/api/v1/settlements", tag = "settlements",
    params(ListSettlementsQuery, PageQuery),
    responses(
        (status = 200, description = "In (merchant_id, date) order", body = Page<Settlement>),
        (status = 422, description = "INVALID_LIMIT, INVALID_DATE, INVALID_DATE_RANGE, INVALID_MERCHANT_ID", body = ErrorBody),
    )
)]
async fn list_settlements(
    State(app): State<AppState>,
    Extension(caller): Extension<Principal>,
    ListQuery(query, page): ListQuery<ListSettlementsQuery>,
) -> Result<Json<Page<Settlement>>, ApiError> {
    let limit = page.limit(&app.config.pagination)?;
    let from = query.from.as_deref().map(|d| day(d, "from")).transpose()?;
    let to = query.to.as_deref().map(|d| day(d, "to")).transpose()?;
    if from.zip(to).is_some_and(|(from, to)| from > to) {
        return Err(ApiError::invalid(
            "INVALID_DATE_RANGE",
            "to",
            "from must not be after to",
        ));
    }
    let after = page.cursor().map(parse_cursor).transpose()?;
    let asked = text_filter(query.merchant_id, "INVALID_MERCHANT_ID", "merchant_id")?;
    let merchant_id = match (caller.role, caller.merchant_id) {
        (Role::Merchant, Some(own)) if asked.as_ref().is_none_or(|m| *m == own) => Some(own),
        (Role::Merchant, _) => return Ok(Json(Page::empty())),
        _ => asked,
    };
    let filter = SettlementFilter {
        merchant_id,
        from,
        to,
        after,
    };
    let mut conn = app.pool.acquire().await?;
    let rows = list::list(&mut conn, &filter, limit + 1).await?;
    Ok(Json(Page::of(rows, limit, cursor)))
}

fn day(raw: &str, field: &'static str) -> Result<NaiveDate, ApiError> {
    settlement::parse_day(raw).ok_or_else(|| {
        ApiError::invalid(
            "INVALID_DATE",
            field,
            format!("{field} must be a calendar day as YYYY-MM-DD"),
        )
    })
}

/// `{days since 1970-01-01}_{merchant id as hex}`: opaque to clients, safe in a query string
/// whatever characters the merchant id holds, and every string of [`CURSOR_PATTERN`] is a
/// position in `(merchant_id, date)` order, so the document can say exactly what is accepted.
fn cursor(row: &SettlementRow) -> String {
    let days = (row.date - NaiveDate::default()).num_days();
    format!("{days}_{}", hex::encode(&row.merchant_id))
}

/// What [`cursor`] writes: days before 1970 are negative (`paid_at` takes any year from 0000
/// to 9999: six digits back reach 769 BC, seven ahead 29349 AD, both days Postgres can hold),
/// and no NUL byte in the merchant id, which Postgres text cannot hold.
pub const CURSOR_PATTERN: &str = r"^(-[0-9]{1,6}|[0-9]{1,7})_([1-9a-f][0-9a-f]|0[1-9a-f])*$";

/// The position a [`CURSOR_PATTERN`] cursor names; anything else is refused, as the document
/// says (`str::parse` and `hex::decode` alone also take `+5`, eight digits, upper-case hex).
fn parse_cursor(raw: &str) -> Result<(String, NaiveDate), ApiError> {
    let parsed = raw.split_once('_').and_then(|(days, merchant)| {
        let date =
            NaiveDate::default().checked_add_signed(chrono::Duration::days(day_count(days)?))?;
        let lower_hex = merchant
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let bytes = hex::decode(merchant)
            .ok()
            .filter(|b| lower_hex && !b.contains(&0))?;
        // Any bytes are a position in the order; a merchant id never holds invalid UTF-8.
        Some((String::from_utf8_lossy(&bytes).into_owned(), date))
    });
    parsed.ok_or_else(pagination::invalid_cursor)
}

/// The days since 1970 as [`cursor`] writes them: up to six digits after a minus, seven without.
fn day_count(raw: &str) -> Option<i64> {
    let (digits, most) = match raw.strip_prefix('-') {
        Some(digits) => (digits, 6),
        None => (raw, 7),
    };
    let written = (1..=most).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    written.then(|| raw.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_any_merchant_id() {
        let row = SettlementRow {
            merchant_id: "m_1 & ü/?".into(),
            date: NaiveDate::from_ymd_opt(2025, 1, 31).unwrap(),
            gross_cents: 0,
            fee_cents: 0,
            net_cents: 0,
            txn_count: 1,
            generated_at: Utc::now(),
            job_id: 1,
        };
        for date in [(2025, 1, 31), (1969, 12, 31), (0, 1, 1), (9999, 12, 31)] {
            let row = SettlementRow {
                date: NaiveDate::from_ymd_opt(date.0, date.1, date.2).unwrap(),
                ..row.clone()
            };
            let (merchant, date) = parse_cursor(&cursor(&row)).unwrap();
            assert_eq!(
                (merchant.as_str(), date),
                (row.merchant_id.as_str(), row.date)
            );
        }
        for bad in [
            "",
            "-1000000_6d",
            "10000000_6d",
            "2025-01-31",
            "2025-13-01_6d",
            "2025-01-31_zz",
            "2025-01-31_ff",
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cursor_is_taken_exactly_when_the_document_allows_it() {
        let samples = [
            "20089_6d2d31",
            "-999999_6d",
            "9999999_",
            "0000000_6d",
            "-0_6d",
            "20089_6D2D31",
            "20089_6d2D31",
            "+5_6d",
            "-0000001_6d",
            "00000000_6d",
            "10000000_6d",
            " 5_6d",
            "5_6d2",
            "5_006d",
            "5_6d_6d",
            "_6d",
            "-_6d",
        ];
        let takes = |raw: &str| parse_cursor(raw).is_ok();
        pagination::assert_takes_what_the_pattern_allows(CURSOR_PATTERN, takes, &samples);
    }
}
