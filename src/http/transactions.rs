//! `POST /api/v1/transactions`: one transaction or an array of them, stored exactly once:
//! duplicates skipped and counted, a conflicting re-send refused with nothing stored.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::RawJson;
use super::idempotency::{KeyHeader, commit, replay, respond};
use super::openapi::ErrorBody;
use super::{AppState, Started};
use crate::idempotency::{self, Begun};
use crate::settlement::transactions::{self, Ingested, NewTransaction, RawTransaction};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/transactions", post(create_transactions))
}

/// `POST /api/v1/transactions` element, as received.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransactionInput {
    /// 1 to 255 characters, not blank.
    pub merchant_id: String,
    /// The payment provider's id for this payment: 1 to 128 visible ASCII characters, unique
    /// per merchant. Re-sending it with the same fields is a harmless duplicate.
    pub external_id: String,
    /// Amount charged, in cents, ≥ 0.
    #[serde(deserialize_with = "super::extract::integer")]
    pub amount_cents: i64,
    /// Fee taken, in cents, 0 ≤ fee ≤ amount.
    #[serde(deserialize_with = "super::extract::integer")]
    pub fee_cents: i64,
    /// `PAID`, `PENDING`, `FAILED` or `REFUNDED`; only `PAID` is settled.
    pub status: String,
    /// RFC 3339 instant with an offset, e.g. `2025-01-31T23:59:59Z`, from
    /// `0001-01-02T00:00:00Z` up to (not including) `9999-12-31T00:00:00Z`, so its day in any
    /// time zone is in the years 1 to 9999; 422 `INVALID_PAID_AT` outside. Kept to the
    /// microsecond: finer digits are dropped (toward the past), and a leap second `23:59:60`
    /// (UTC: a second 60 in any other minute is 422) is kept as `23:59:59.999999`, so an
    /// instant always settles on its own day.
    pub paid_at: String,
}

impl From<TransactionInput> for RawTransaction {
    fn from(t: TransactionInput) -> Self {
        Self {
            merchant_id: t.merchant_id,
            external_id: t.external_id,
            amount_cents: t.amount_cents,
            fee_cents: t.fee_cents,
            status: t.status,
            paid_at: t.paid_at,
        }
    }
}

/// `{"inserted", "duplicates"}`: what a stored request did.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct IngestReport {
    /// Transactions stored by this request.
    pub inserted: u64,
    /// Elements whose `(merchant_id, external_id)` was already stored with the same fields
    /// (or repeated within the request): nothing stored for them.
    pub duplicates: u64,
}

/// Store payment transactions: one object, or an array of 1 to
/// `settlement.max_transactions_per_request`. Each is identified by `(merchant_id,
/// external_id)`: re-sending one with identical fields stores nothing and counts it in
/// `duplicates`; re-sending one with any field different is 409 `TRANSACTION_CONFLICT` and
/// nothing of the request is stored. An invalid element stores nothing of the request either.
#[utoipa::path(
    post, path = "/api/v1/transactions", tag = "transactions",
    request_body(content = TransactionInput,
        description = "One transaction, or a JSON array of 1 to `settlement.max_transactions_per_request` of them"),
    params(KeyHeader),
    responses(
        (status = 201, description = "Stored: how many were new and how many were duplicates", body = IngestReport),
        (status = 409, description = "TRANSACTION_CONFLICT (names the index, merchant_id and external_id; \
            nothing stored), IDEMPOTENCY_KEY_IN_USE", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "INVALID_MERCHANT_ID, INVALID_EXTERNAL_ID, INVALID_AMOUNT, INVALID_FEE, \
            INVALID_STATUS, INVALID_PAID_AT (message names the array index), INVALID_BATCH_SIZE, \
            INVALID_IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_REUSED", body = ErrorBody),
    )
)]
async fn create_transactions(
    State(app): State<AppState>,
    started: Started,
    key: KeyHeader,
    RawJson(raw): RawJson,
) -> Result<Response, ApiError> {
    let key = key.scoped("transactions")?;
    let parsed = parse(&raw, app.config.settlement.max_transactions_per_request)?;
    // The request as its key stores it (a resend is compared with it as jsonb); without a key
    // nothing reads it, and the body is not parsed a second time.
    let body = match &key {
        Some(_) => keyed_request(&raw, &parsed)?,
        None => Value::Null,
    };
    let mut tx = match idempotency::begin(key.as_ref(), &app.pool, &body).await? {
        Begun::Execute(tx) => tx,
        Begun::Replay(stored) => return replay(stored),
    };
    let (inserted, duplicates) = match transactions::ingest(&mut tx, &parsed).await? {
        Ingested::Stored {
            inserted,
            duplicates,
        } => (inserted, duplicates),
        Ingested::Conflict {
            index,
            merchant_id,
            external_id,
            earlier,
        } => {
            // Nothing of the request is stored, the key included: a corrected retry may reuse it.
            tx.rollback().await?;
            return Err(ApiError::TransactionConflict {
                index,
                merchant_id,
                external_id,
                earlier,
            });
        }
    };
    let report = serde_json::to_value(IngestReport {
        inserted,
        duplicates,
    })
    .map_err(anyhow::Error::from)?;
    let answer = (StatusCode::CREATED, &report);
    commit(&app, &started, key.as_ref(), tx, &body, answer).await?;
    Ok(respond(StatusCode::CREATED, report))
}

/// The request as its key stores it: the body, with each amount as the exact integer it was
/// read as. A `Value` holds a number written with a fraction or an exponent as the nearest
/// float, so `9007199254740993.0` and `9007199254740994.0` would compare equal and a resend
/// with the other amount would be replayed instead of refused.
fn keyed_request(raw: &RawValue, parsed: &[NewTransaction]) -> Result<Value, ApiError> {
    let mut body: Value = serde_json::from_str(raw.get()).map_err(anyhow::Error::from)?;
    let elements = match &mut body {
        Value::Array(items) => items.iter_mut().collect(),
        one => vec![one],
    };
    for (element, parsed) in elements.into_iter().zip(parsed) {
        element["amount_cents"] = parsed.amount_cents.into();
        element["fee_cents"] = parsed.fee_cents.into();
    }
    Ok(body)
}

/// The request's transactions, parsed: an object is one, an array 1 to `max`. Each element is
/// deserialized from its own text, not from a `Value`, whose map would keep only the last of a
/// key written twice: `{"merchant_id": "a", …, "merchant_id": "b"}` is refused, not stored
/// for `b`.
fn parse(body: &RawValue, max: usize) -> Result<Vec<NewTransaction>, ApiError> {
    if !body.get().starts_with('[') {
        return Ok(vec![element(body, None)?]);
    }
    let items: Vec<&RawValue> = shape(body, None)?;
    if items.is_empty() || items.len() > max {
        return Err(ApiError::invalid(
            "INVALID_BATCH_SIZE",
            "transactions",
            format!("an array must hold 1 to {max} transactions"),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| element(item, Some(i)))
        .collect()
}

/// One element, deserialized and parsed; `index` is its position in an array. It must be an
/// object: serde would also take an array of the fields in order.
fn element(item: &RawValue, index: Option<usize>) -> Result<NewTransaction, ApiError> {
    let what = match index {
        Some(i) => format!("transactions[{i}]"),
        None => "a transaction".to_owned(),
    };
    super::extract::require_object(item, &what)?;
    let input = shape::<TransactionInput>(item, index)?;
    Ok(RawTransaction::from(input).parse(index)?)
}

/// Deserializes one element, answering 400 (wrong shape or types) like the JSON extractor does.
fn shape<'a, T: Deserialize<'a>>(raw: &'a RawValue, index: Option<usize>) -> Result<T, ApiError> {
    serde_json::from_str(raw.get()).map_err(|e| ApiError::BadRequest {
        code: "INVALID_BODY",
        message: match index {
            Some(i) => format!("transactions[{i}]: {e}"),
            None => e.to_string(),
        },
    })
}
