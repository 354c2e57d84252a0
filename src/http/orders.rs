//! `/api/v1/orders`: place (optionally idempotent), get, list.

use std::convert::Infallible;

use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use settle_workers::error::sql_state;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::ApiError;
use super::extract::{Int, Json, ListQuery, Path};
use super::idempotency::{KeyHeader, replay};
use super::pagination::{Page, PageQuery, text_filter};
use crate::db::is_connection_error;
use crate::idempotency::{Begun, IdempotencyKey, StoredResponse};
use crate::metrics::{OrderCount, OrderOutcome};
use crate::orders::coalesce::{Answer, CoalesceError, Keyed};
use crate::orders::store::{self, OrderFilter};
use crate::orders::{self, NewOrder, Order, Rejected, outcome};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orders", post(place_order).get(list_orders))
        .route("/api/v1/orders/{id}", get(get_order))
}

// An order as answered (a `///` here would change the schema's OpenAPI description).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Order)]
pub struct OrderBody {
    pub id: i64,
    pub product_id: i64,
    pub buyer_id: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
    pub total_cents: i64,
    pub created_at: DateTime<Utc>,
}

impl From<orders::Order> for OrderBody {
    fn from(o: orders::Order) -> Self {
        Self {
            id: o.id,
            product_id: o.product_id,
            buyer_id: o.buyer_id,
            quantity: o.quantity,
            unit_price_cents: o.unit_price_cents,
            total_cents: o.total_cents,
            created_at: o.created_at,
        }
    }
}

/// `POST /api/v1/orders` body, as received.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    #[serde(deserialize_with = "super::extract::integer")]
    pub product_id: i64,
    #[serde(deserialize_with = "super::extract::integer")]
    pub quantity: i64,
    pub buyer_id: String,
}

/// Place an order. Never oversells: the decrement and the insert are one statement.
#[utoipa::path(
    post, path = "/api/v1/orders", tag = "orders",
    params(KeyHeader),
    responses(
        (status = 201, description = "Order placed", body = OrderBody),
        (status = 400, description = "MALFORMED_JSON, INVALID_BODY", body = super::openapi::ErrorBody),
        (status = 404, description = "NOT_FOUND: unknown product", body = super::openapi::ErrorBody),
        (status = 409, description = "OUT_OF_STOCK (with `available`), IDEMPOTENCY_KEY_IN_USE", body = super::openapi::ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::openapi::ErrorBody),
        (status = 422, description = "INVALID_QUANTITY, INVALID_BUYER_ID, INVALID_IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_REUSED", body = super::openapi::ErrorBody),
        (status = 503, description = "ORDER_NOT_PLACED: the database connection failed, or the transaction was aborted or ran past `orders.batch_timeout_ms`, and the order was certainly not placed; retrying is safe. \
            ORDER_OUTCOME_UNKNOWN: the connection failed during the commit, or the request ran past `http.request_timeout_ms`, and the service could not find out whether the order was placed \
            (`order_id`, when present, is its id if it was: `GET /api/v1/orders/{order_id}` tells, if that order has the request's buyer_id, product_id and quantity, since a database crash that lost the commit gives the id to a later order); a retry with the same Idempotency-Key \
            replays the order if it was placed and places it if not, while a retry without a key may place a second order. \
            SERVICE_UNAVAILABLE: no database connection free in time, the database unreachable, or the request body not all received within `http.request_timeout_ms`, before anything was placed; retrying is safe", body = super::openapi::ErrorBody),
    )
)]
async fn place_order(
    State(app): State<AppState>,
    // Before the body: an order request past authentication is counted from here on, if only as
    // an error when its body never all arrives or its client hangs up.
    count: OrderCount,
    started: super::Started,
    key: KeyHeader,
    // Taken as a `Result` so that a body refused before it is read as an order (malformed JSON,
    // no JSON content type, too large) is counted as a rejected order like any other refusal.
    request: Result<Json<PlaceOrderRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let answer = match request {
        Ok(Json(request)) => {
            // The body is all here: from now on a timeout cannot say the order was not placed.
            started.mark();
            place(&app, &key, request, &count).await
        }
        Err(refused) => Err(refused),
    };
    // A decision was counted where it was taken (the batch, the placement task); this counts
    // an order refused before one, or failed with none.
    count.count(order_outcome(&answer));
    answer
}

impl<S: Send + Sync> FromRequestParts<S> for OrderCount {
    type Rejection = Infallible;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Self::default())
    }
}

/// `settle_orders_total{outcome}` of an answer; `None` for an earlier request's order: a stored
/// answer replayed, or a key in use by the request placing it.
fn order_outcome(answer: &Result<Response, ApiError>) -> Option<OrderOutcome> {
    Some(match answer {
        Ok(response) if response.extensions().get::<Replayed>().is_some() => return None,
        Ok(response) => OrderOutcome::of_answer(response.status().as_u16()),
        Err(ApiError::IdempotencyKeyInUse) => return None,
        Err(ApiError::OutOfStock { .. }) => OrderOutcome::OutOfStock,
        Err(error) if error.status().is_client_error() => OrderOutcome::Rejected,
        Err(_) => OrderOutcome::Error,
    })
}

/// Marks a response as the replay of a stored answer.
#[derive(Debug, Clone, Copy)]
struct Replayed;

async fn place(
    app: &AppState,
    key: &KeyHeader,
    request: PlaceOrderRequest,
    count: &OrderCount,
) -> Result<Response, ApiError> {
    let key = key.scoped("orders")?;
    let request_json = serde_json::to_value(&request).map_err(anyhow::Error::from)?;
    let order = NewOrder::parse(
        request.product_id,
        request.quantity,
        request.buyer_id,
        &app.config.orders,
    )?;
    if app.config.orders.coalesce {
        // With the product's other waiting orders; a key is taken and its answer stored by
        // the batch's transaction.
        let key = key.map(|key| Keyed {
            key,
            request: request_json,
        });
        let answer = app.coalescer.place(order, key, count.clone()).await;
        return coalesced(answer.map_err(coalesce_error)?);
    }
    // A task of its own, as a batch is: the order is placed and counted whether or not the
    // request waits for it (timed out, its client gone).
    let (app, count) = (app.clone(), count.clone());
    let placing = tokio::spawn(async move {
        let answer = place_alone(&app, key, order, request_json).await;
        count.count(order_outcome(&answer));
        answer
    });
    placing.await.map_err(anyhow::Error::from)?
}

/// An order placed without coalescing: its own statement, or with a key, its own transaction.
async fn place_alone(
    app: &AppState,
    key: Option<IdempotencyKey>,
    order: NewOrder,
    request_json: serde_json::Value,
) -> Result<Response, ApiError> {
    let Some(key) = key else {
        let mut conn = app.pool.acquire().await?;
        // One statement, its own transaction: a connection failure while it runs may come
        // after its commit, and no id is known to look for.
        let order = store::place_order(&mut conn, &order)
            .await
            .map_err(|e| unanswered(e, ApiError::OrderOutcomeUnknown { order_id: None }))??;
        return Ok((StatusCode::CREATED, Json(OrderBody::from(order))).into_response());
    };
    let mut tx = match key.start(&app.pool, &request_json).await? {
        Begun::Execute(tx) => tx,
        Begun::Replay(stored) => return replayed(stored),
    };
    let placed = store::place_order(&mut tx, &order)
        .await
        .map_err(|e| unanswered(e, ApiError::OrderNotPlaced))?;
    let order_id = placed.as_ref().ok().map(|order| order.id);
    let answer = stored_answer(&placed).map_err(anyhow::Error::from)?;
    key.store(
        &mut tx,
        &request_json,
        answer.status,
        &answer.body,
        app.config.idempotency.ttl_hours,
    )
    .await
    .map_err(|e| unanswered(e, ApiError::OrderNotPlaced))?;
    if let Err(e) = tx.commit().await {
        // The reply may have been lost after the commit. The transaction held the key's lock
        // from its start to its end: once the lock is free, the stored response (or its
        // absence) is the outcome.
        tracing::warn!(error = %e, "a keyed order's commit failed; checking its outcome");
        return match key.settled(&app.pool, &request_json, outcome::WAIT).await {
            Some(Some(stored)) => replay(stored),
            Some(None) => Err(ApiError::OrderNotPlaced),
            None => Err(ApiError::OrderOutcomeUnknown { order_id }),
        };
    }
    replay(answer)
}

/// A keyed order's answer as stored under its key and sent: the order (201), or the refusal's
/// status and error body. The coalescer stores it through [`KeyStore`](crate::orders::coalesce::KeyStore).
pub fn stored_answer(decided: &Result<Order, Rejected>) -> serde_json::Result<StoredResponse> {
    Ok(match decided {
        Ok(order) => StoredResponse {
            status: StatusCode::CREATED.as_u16(),
            body: serde_json::to_value(OrderBody::from(order.clone()))?,
        },
        Err(rejected) => {
            let error = ApiError::from(rejected.clone());
            StoredResponse {
                status: error.status().as_u16(),
                body: error.body(),
            }
        }
    })
}

/// The HTTP answer to a coalesced order.
fn coalesced(answer: Answer) -> Result<Response, ApiError> {
    match answer {
        Answer::Decided(decided) => {
            let order = decided?;
            Ok((StatusCode::CREATED, Json(OrderBody::from(order))).into_response())
        }
        Answer::Stored(stored) => replay(stored),
        Answer::Replay(stored) => replayed(stored),
        Answer::Refused(e) => Err(e.into()),
    }
}

/// An answer an earlier request stored, marked as a replay.
fn replayed(stored: StoredResponse) -> Result<Response, ApiError> {
    let mut response = replay(stored)?;
    response.extensions_mut().insert(Replayed);
    Ok(response)
}

/// A statement of an order's placement failed. The schema's last line of defence is a 409, a
/// connection failure is `connection_failed` (503), anything else a 500.
fn unanswered(e: sqlx::Error, connection_failed: ApiError) -> ApiError {
    expected_failure(&e, connection_failed).unwrap_or_else(|| ApiError::Internal(e.into()))
}

/// The client error or 503 that `e` stands for; `None` for a 500.
fn expected_failure(e: &sqlx::Error, connection_failed: ApiError) -> Option<ApiError> {
    if is_stock_violation(e) {
        Some(out_of_stock())
    } else if matches!(e, sqlx::Error::PoolTimedOut) {
        Some(ApiError::Unavailable)
    } else if is_connection_error(e) {
        tracing::warn!(error = %e, "an order's database connection failed");
        Some(connection_failed)
    } else if matches!(
        sql_state(e).as_deref(),
        Some("40P01" | "40001" | "55P03" | "57014")
    ) {
        // Postgres aborted the transaction to break a deadlock or a serialization conflict, a
        // coalesced batch waited for a lock past its deadline (`orders.batch_timeout_ms`), or
        // a statement was cancelled (an operator, a statement_timeout): nothing of it was
        // placed, and a retry may well succeed.
        tracing::warn!(error = %e, "an order's transaction was aborted");
        Some(ApiError::OrderNotPlaced)
    } else {
        None
    }
}

/// The schema's last line of defence fired: the statement's own guard should make this
/// unreachable, but if it fires the buyer still gets a 409, not a 500.
fn out_of_stock() -> ApiError {
    ApiError::OutOfStock { available: 0 }
}

fn coalesce_error(e: CoalesceError) -> ApiError {
    match e {
        // The batch failed before its commit: nothing of it was placed.
        CoalesceError::Sql(e) => expected_failure(&e, ApiError::OrderNotPlaced)
            .unwrap_or_else(|| ApiError::Internal(CoalesceError::Sql(e).into())),
        CoalesceError::NotPlaced => ApiError::OrderNotPlaced,
        CoalesceError::OutcomeUnknown { order_id } => ApiError::OrderOutcomeUnknown { order_id },
        other @ CoalesceError::Dropped => ApiError::Internal(other.into()),
    }
}

fn is_stock_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.constraint() == Some("stock_not_negative"))
}

#[utoipa::path(
    get, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = OrderBody),
    )
)]
async fn get_order(
    State(app): State<AppState>,
    Path(Int(id)): Path<Int>,
) -> Result<Json<OrderBody>, ApiError> {
    let mut conn = app.pool.acquire().await?;
    store::get_order(&mut conn, id)
        .await?
        .map(|o| Json(o.into()))
        .ok_or_else(|| ApiError::NotFound("order not found".into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListOrdersQuery {
    #[param(value_type = Option<i64>)]
    product_id: Option<Int>,
    #[param(min_length = 1)]
    buyer_id: Option<String>,
}

#[utoipa::path(
    get, path = "/api/v1/orders", tag = "orders",
    params(ListOrdersQuery, PageQuery),
    responses(
        (status = 200, description = "Newest first", body = Page<OrderBody>),
        (status = 422, description = "INVALID_LIMIT, INVALID_BUYER_ID", body = super::openapi::ErrorBody),
    )
)]
async fn list_orders(
    State(app): State<AppState>,
    ListQuery(query, page): ListQuery<ListOrdersQuery>,
) -> Result<Json<Page<OrderBody>>, ApiError> {
    let limit = page.limit(&app.config.pagination)?;
    let filter = OrderFilter {
        product_id: query.product_id.map(|Int(id)| id),
        buyer_id: text_filter(query.buyer_id, "INVALID_BUYER_ID", "buyer_id")?,
        before_id: page.before()?,
    };
    let mut conn = app.pool.acquire().await?;
    let rows = store::list_orders(&mut conn, &filter, limit + 1).await?;
    Ok(Json(Page::by_id(rows, limit, |o| o.id)))
}
