//! `POST /api/v1/transactions`: one transaction or an array of them, stored all or none.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::AppState;
use super::error::ApiError;
use super::extract::Json;
use super::openapi::ErrorBody;
use crate::settlement::transactions::{self, NewTransaction, Transaction, TransactionInput};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/transactions", post(create_transactions))
}

/// Store payment transactions. A single object answers with the stored row; an array (at most
/// `settlement.max_transactions_per_request` elements) answers with the stored rows in input
/// order, and is stored entirely or, if any element is invalid, not at all.
#[utoipa::path(
    post, path = "/api/v1/transactions", tag = "transactions",
    request_body(content = TransactionInput,
        description = "One transaction, or a JSON array of 1 to `settlement.max_transactions_per_request` of them"),
    responses(
        (status = 201, description = "Stored: the row for an object, an array of rows for an array", body = Transaction),
        (status = 400, description = "MALFORMED_JSON, INVALID_BODY", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "INVALID_MERCHANT_ID, INVALID_AMOUNT, INVALID_FEE, INVALID_STATUS, \
            INVALID_PAID_AT (message names the array index), INVALID_BATCH_SIZE", body = ErrorBody),
    )
)]
async fn create_transactions(
    State(app): State<AppState>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let max = app.config.settlement.max_transactions_per_request;
    let mut conn = app.pool.acquire().await?;
    match body {
        Value::Array(items) => {
            if items.is_empty() || items.len() > max {
                return Err(ApiError::invalid(
                    "INVALID_BATCH_SIZE",
                    "transactions",
                    format!("an array must hold 1 to {max} transactions"),
                ));
            }
            let parsed = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| shape::<TransactionInput>(item, Some(i))?.parse(Some(i)))
                .collect::<Result<Vec<NewTransaction>, _>>()?;
            let stored = transactions::insert_all(&mut conn, &parsed).await?;
            Ok((StatusCode::CREATED, Json(stored)).into_response())
        }
        single => {
            let parsed = shape::<TransactionInput>(single, None)?.parse(None)?;
            let mut stored = transactions::insert_all(&mut conn, &[parsed]).await?;
            let row = stored
                .pop()
                .ok_or_else(|| anyhow::anyhow!("insert returned no row"))?;
            Ok((StatusCode::CREATED, Json(row)).into_response())
        }
    }
}

/// Deserializes one element, answering 400 (wrong shape or types) like the JSON extractor does.
fn shape<T: DeserializeOwned>(value: Value, index: Option<usize>) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| ApiError::BadRequest {
        code: "INVALID_BODY",
        message: match index {
            Some(i) => format!("transactions[{i}]: {e}"),
            None => e.to_string(),
        },
    })
}
