//! The `Idempotency-Key` header, and stored responses replayed as HTTP responses. The keys'
//! storage is the domain's [`crate::idempotency`].

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use crate::idempotency::{IdempotencyError, IdempotencyKey, StoredResponse};

/// The header a client names its key in.
pub const HEADER: &str = "idempotency-key";

/// The header as the OpenAPI document shows it, once for every endpoint that takes a key
/// (`params(KeyHeader)`); [`key`] reads it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code, reason = "only describes the header; `key` reads it")]
pub struct KeyHeader {
    /// Up to 255 characters; a retry with the same key and body is answered with the first
    /// answer again (its status and body) instead of being acted on twice.
    #[param(rename = "Idempotency-Key")]
    key: Option<String>,
}

/// The request's key for the endpoint `scope`, if it sent one.
pub fn key(scope: &'static str, headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let raw = value.to_str().map_err(|_| IdempotencyError::InvalidKey)?;
    Ok(Some(IdempotencyKey::parse(scope, raw)?))
}

/// A stored response's status; a stored number that is not one is an internal error.
pub fn status(stored: &StoredResponse) -> Result<StatusCode, ApiError> {
    StatusCode::from_u16(stored.status).map_err(|e| ApiError::Internal(e.into()))
}

/// `body` answered with `status`, as a first answer or a replay.
pub fn respond(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// The stored response, answered again verbatim.
pub fn replay(stored: StoredResponse) -> Result<Response, ApiError> {
    Ok(respond(status(&stored)?, stored.body))
}
