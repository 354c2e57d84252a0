//! The `Idempotency-Key` header, and stored responses replayed as HTTP responses. The keys'
//! storage is the domain's [`crate::idempotency`].

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sqlx::{Postgres, Transaction};

use super::error::ApiError;
use super::{AppState, Started};
use crate::idempotency::{self, IdempotencyError, IdempotencyKey, StoredResponse};
use crate::tokens::Principal;

/// The header a client names its key in.
pub const HEADER: &str = "idempotency-key";

/// The request's `Idempotency-Key` header, as sent: handlers extract it (never refused: a bad
/// key is answered by the handler, in its place among the request's checks, see
/// [`KeyHeader::scoped`]), and the OpenAPI document shows it once for every endpoint that takes
/// a key (`params(KeyHeader)`).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct KeyHeader {
    /// Up to 255 characters; a retry with the same key and body is answered with the first
    /// answer again (its status and body) instead of being acted on twice.
    /// A retry must carry the same token: each token's keys are its own.
    #[param(rename = "Idempotency-Key", value_type = Option<String>)]
    key: Option<HeaderValue>,
    /// The id of the token that authenticated the request (put in the request's extensions by
    /// the auth middleware); `None` on a route that takes no token (no keyed route does).
    #[param(ignore)]
    token_id: Option<i64>,
    /// The header came more than once: refused, never one of them used silently.
    #[param(ignore)]
    repeated: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for KeyHeader {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        let mut values = parts.headers.get_all(HEADER).iter();
        let key = values.next().cloned();
        let repeated = values.next().is_some();
        let token_id = parts.extensions.get::<Principal>().map(|p| p.token_id);
        Ok(Self {
            key,
            token_id,
            repeated,
        })
    }
}

impl KeyHeader {
    /// The key for the endpoint `scope` and the request's token, if the request sent one.
    pub fn scoped(&self, scope: &'static str) -> Result<Option<IdempotencyKey>, ApiError> {
        let Some(value) = &self.key else {
            return Ok(None);
        };
        if self.repeated {
            return Err(ApiError::invalid(
                "INVALID_IDEMPOTENCY_KEY",
                "Idempotency-Key",
                "send one Idempotency-Key header, not several",
            ));
        }
        let raw = value.to_str().map_err(|_| IdempotencyError::InvalidKey)?;
        let key = IdempotencyKey::parse(scope, raw)?;
        Ok(Some(match self.token_id {
            Some(token_id) => key.owned_by(token_id),
            None => key,
        }))
    }
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

/// Commits a write's transaction with `answer` stored under the key, if the request sent one
/// ([`idempotency::commit`]): `Ok` if it took effect, its reply lost or not; 503
/// `OUTCOME_UNKNOWN` if that could not be found out. From here on the request is
/// [`Started`]: a timeout cannot say nothing happened.
pub(crate) async fn commit(
    app: &AppState,
    started: &Started,
    key: Option<&IdempotencyKey>,
    tx: Transaction<'static, Postgres>,
    request: &Value,
    (status, body): (StatusCode, &Value),
) -> Result<(), ApiError> {
    started.mark();
    let ttl = app.config.idempotency.ttl_hours;
    let answer = (status.as_u16(), body);
    Ok(idempotency::commit(key, &app.pool, tx, request, answer, ttl).await?)
}
