//! The API's one error type and its one mapping to HTTP.
//!
//! Every failure a handler can meet becomes an [`ApiError`]: the domain's own errors by the
//! `From` impls below, which alone decide their status and code. [`IntoResponse`] turns it into
//! `{"error": {"code", "message", …details}}` with a stable upper-snake `code`. Database and
//! unexpected errors become an opaque 500, logged once inside the request's span (which carries
//! the request id), never with details sent to the client.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::commit::CommitError;
use crate::idempotency::IdempotencyError;
use crate::orders::{InvalidInput, Rejected};
use crate::settlement::RangeError;
use crate::settlement::transactions::{Field, InvalidTransaction};

/// Why a request failed, in terms the client can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not JSON of the expected shape (400).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// No token, or one that is malformed, unknown or revoked (401, with
    /// `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The token is valid but its role may not do this (403).
    #[error("the {0} role may not do this")]
    Forbidden(crate::tokens::Role),
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body exceeds `http.max_body_bytes` (413).
    #[error("request body too large")]
    PayloadTooLarge,
    /// The body is not `application/json` (415).
    #[error("expected a JSON body with content-type application/json")]
    UnsupportedMediaType,
    /// Well-formed input with a value the service refuses (422), naming the field and, for an
    /// element of a batch, its index.
    #[error("{message}")]
    Invalid {
        code: &'static str,
        field: &'static str,
        index: Option<usize>,
        message: String,
    },
    /// Fewer units remain than the order asked for (409).
    #[error("only {available} unit(s) left")]
    OutOfStock { available: i64 },
    /// The Idempotency-Key was used before with a different request (422).
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    /// Another request with this Idempotency-Key is in flight (409).
    #[error("a request with this Idempotency-Key is already in progress; retry later")]
    IdempotencyKeyInUse,
    /// A transaction whose `(merchant_id, external_id)` is stored, or held by the request's
    /// `earlier` element, with different fields (409); nothing of the request was stored.
    #[error("transactions[{index}]: {}", conflict(merchant_id, external_id, *earlier))]
    TransactionConflict {
        index: usize,
        merchant_id: String,
        external_id: String,
        earlier: Option<usize>,
    },
    /// A retry of a job that is not FAILED or CANCELLED (409), with its current state.
    #[error("only a FAILED or CANCELLED job can be retried; this one is {}", state.as_api_str())]
    NotRetryable { state: settle_workers::JobState },
    /// The request conflicts with the resource's state (409).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// No database connection became free in time, the connection failed, or the request ran
    /// too long (503).
    #[error(
        "nothing was done: the database is unreachable or busy, or the request ran out of time; \
         retry later"
    )]
    Unavailable,
    /// The order was certainly not placed: its database connection failed before the commit,
    /// Postgres aborted its transaction (a deadlock broken, a serialization conflict), or the
    /// commit was found not to have taken effect (503). Retrying is safe.
    #[error("the order was not placed (its transaction did not commit); retry")]
    OrderNotPlaced,
    /// The commit's reply was lost, or the request ran out of time, and the service could not
    /// find out whether it took effect (503). `order_id` is the order's id if it did.
    #[error(
        "the order may or may not have been placed (the database connection failed during the \
         commit, or the request ran past its time limit); retry with the same Idempotency-Key, \
         or look up order_id, to find out"
    )]
    OrderOutcomeUnknown { order_id: Option<i64> },
    /// Any other write whose commit's reply was lost, or which ran out of time once its commit
    /// was sent, and the service could not find out whether it took effect (503). A plain
    /// [`Self::Unavailable`] there would tell a client without a key to retry, which may do
    /// the write twice.
    #[error(
        "the request may or may not have taken effect (the database connection failed during \
         the commit, or the request ran past its time limit); a retry with the same \
         Idempotency-Key answers what happened (or does it, if nothing did), a retry without \
         one may do it twice"
    )]
    OutcomeUnknown,
    /// Anything else: logged, answered with an opaque 500.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// What an [`ApiError::TransactionConflict`] met: a stored transaction, or another element of
/// the request (then nothing need be stored for the conflict to exist).
fn conflict(merchant_id: &str, external_id: &str, earlier: Option<usize>) -> String {
    match earlier {
        None => format!(
            "merchant {merchant_id:?} already has a transaction {external_id:?} with different \
             fields"
        ),
        Some(earlier) => format!(
            "the request holds two different transactions {external_id:?} of merchant \
             {merchant_id:?} (the other is transactions[{earlier}])"
        ),
    }
}

impl ApiError {
    pub fn invalid(code: &'static str, field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            field,
            index: None,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Invalid { .. } | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::OutOfStock { .. }
            | Self::IdempotencyKeyInUse
            | Self::Conflict { .. }
            | Self::NotRetryable { .. }
            | Self::TransactionConflict { .. } => StatusCode::CONFLICT,
            Self::Unavailable
            | Self::OrderNotPlaced
            | Self::OrderOutcomeUnknown { .. }
            | Self::OutcomeUnknown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } | Self::Invalid { code, .. } => code,
            Self::Conflict { code, .. } => code,
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::Forbidden(_) => "FORBIDDEN",
            Self::NotFound(_) => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::OutOfStock { .. } => "OUT_OF_STOCK",
            Self::TransactionConflict { .. } => "TRANSACTION_CONFLICT",
            Self::NotRetryable { .. } => "JOB_NOT_RETRYABLE",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::IdempotencyKeyInUse => "IDEMPOTENCY_KEY_IN_USE",
            Self::Unavailable => "SERVICE_UNAVAILABLE",
            Self::OrderNotPlaced => "ORDER_NOT_PLACED",
            Self::OrderOutcomeUnknown { .. } => "ORDER_OUTCOME_UNKNOWN",
            Self::OutcomeUnknown => "OUTCOME_UNKNOWN",
            Self::Internal(_) => "INTERNAL",
        }
    }

    /// The `{"error": …}` body this error is answered with.
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), self.code().into());
        let message = match self {
            Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        error.insert("message".into(), message.into());
        match self {
            Self::OutOfStock { available } => {
                error.insert("available".into(), (*available).into());
            }
            Self::Invalid { field, index, .. } => {
                error.insert("field".into(), (*field).into());
                if let Some(index) = index {
                    error.insert("index".into(), (*index).into());
                }
            }
            Self::TransactionConflict {
                index,
                merchant_id,
                external_id,
                ..
            } => {
                error.insert("index".into(), (*index).into());
                error.insert("merchant_id".into(), merchant_id.as_str().into());
                error.insert("external_id".into(), external_id.as_str().into());
            }
            Self::NotRetryable { state } => {
                error.insert("status".into(), state.as_api_str().into());
            }
            Self::OrderOutcomeUnknown { order_id: Some(id) } => {
                error.insert("order_id".into(), (*id).into());
            }
            _ => {}
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(e) => tracing::error!(error = ?e, "request failed"),
            Self::Unavailable => {
                tracing::warn!("request refused: overloaded or database unreachable")
            }
            Self::OrderNotPlaced => {
                tracing::warn!("order not placed: its transaction did not commit")
            }
            Self::OrderOutcomeUnknown { order_id } => {
                tracing::error!(
                    ?order_id,
                    "order outcome unknown: the commit reply was lost"
                )
            }
            Self::OutcomeUnknown => {
                tracing::error!("write outcome unknown: the commit reply was lost")
            }
            _ => {}
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Self::Unauthenticated(_) = self {
            // RFC 6750: a 401 names the scheme the client should use.
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => Self::Unavailable,
            e if crate::db::is_connection_error(&e) => Self::Unavailable,
            other => Self::Internal(other.into()),
        }
    }
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::NotCommitted(e) => e.into(),
            CommitError::Unknown(_) => Self::OutcomeUnknown,
        }
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        let (code, field) = match e {
            InvalidInput::Name => ("INVALID_NAME", "name"),
            InvalidInput::Stock => ("INVALID_STOCK", "stock"),
            InvalidInput::Price => ("INVALID_PRICE", "price_cents"),
            InvalidInput::Quantity { .. } => ("INVALID_QUANTITY", "quantity"),
            InvalidInput::BuyerId => ("INVALID_BUYER_ID", "buyer_id"),
        };
        Self::invalid(code, field, e.to_string())
    }
}

impl From<Rejected> for ApiError {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::UnknownProduct => Self::NotFound("product not found".into()),
            Rejected::OutOfStock { available } => Self::OutOfStock { available },
        }
    }
}

impl From<RangeError> for ApiError {
    fn from(e: RangeError) -> Self {
        let code = match e {
            RangeError::NotADay { .. } => "INVALID_DATE",
            RangeError::Reversed | RangeError::TooLong { .. } => "INVALID_DATE_RANGE",
        };
        Self::invalid(code, e.field(), e.to_string())
    }
}

impl From<InvalidTransaction> for ApiError {
    fn from(e: InvalidTransaction) -> Self {
        let code = match e.field {
            Field::MerchantId => "INVALID_MERCHANT_ID",
            Field::ExternalId => "INVALID_EXTERNAL_ID",
            Field::Amount => "INVALID_AMOUNT",
            Field::Fee => "INVALID_FEE",
            Field::Status => "INVALID_STATUS",
            Field::PaidAt => "INVALID_PAID_AT",
        };
        Self::Invalid {
            code,
            field: e.field.name(),
            index: e.index,
            message: e.to_string(),
        }
    }
}

impl From<IdempotencyError> for ApiError {
    fn from(e: IdempotencyError) -> Self {
        match e {
            IdempotencyError::InvalidKey => {
                Self::invalid("INVALID_IDEMPOTENCY_KEY", "Idempotency-Key", e.to_string())
            }
            IdempotencyError::KeyInUse => Self::IdempotencyKeyInUse,
            IdempotencyError::KeyReused => Self::IdempotencyKeyReused,
            IdempotencyError::Sql(e) => e.into(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonSyntaxError(e) => Self::BadRequest {
                code: "MALFORMED_JSON",
                message: format!("malformed JSON: {}", e.body_text()),
            },
            JsonRejection::JsonDataError(e) => Self::BadRequest {
                code: "INVALID_BODY",
                message: e.body_text(),
            },
            JsonRejection::MissingJsonContentType(_) => Self::UnsupportedMediaType,
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            other => Self::BadRequest {
                code: "INVALID_BODY",
                message: other.body_text(),
            },
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::BadRequest {
            code: "INVALID_PATH",
            message: rejection.body_text(),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest {
            code: "INVALID_QUERY",
            message: rejection.body_text(),
        }
    }
}

/// Turns a violation of a named constraint into the API error it stands for, so the database's
/// last line of defence still answers with a client error instead of a 500.
pub trait ConstraintExt<T> {
    fn on_constraint(self, name: &str, to_error: impl FnOnce() -> ApiError) -> Result<T, ApiError>;
}

impl<T> ConstraintExt<T> for Result<T, sqlx::Error> {
    fn on_constraint(self, name: &str, to_error: impl FnOnce() -> ApiError) -> Result<T, ApiError> {
        self.map_err(|e| match &e {
            sqlx::Error::Database(db) if db.constraint() == Some(name) => to_error(),
            _ => e.into(),
        })
    }
}
