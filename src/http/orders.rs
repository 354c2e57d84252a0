//! `/api/v1/orders`: place (optionally idempotent), get, list.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ConstraintExt};
use super::extract::{Json, Path, Query};
use super::pagination::Cursor;
use crate::idempotency::{Begun, IdempotencyKey};
use crate::orders::coalesce::CoalesceError;
use crate::orders::store::{self, OrderFilter};
use crate::orders::{Order, PlaceOrderRequest};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orders", post(place_order).get(list_orders))
        .route("/api/v1/orders/{id}", get(get_order))
}

/// Place an order. Never oversells: the decrement and the insert are one statement.
#[utoipa::path(
    post, path = "/api/v1/orders", tag = "orders",
    request_body = PlaceOrderRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Up to 255 characters; a retry with the same key and body replays the stored response")),
    responses(
        (status = 201, description = "Order placed", body = Order),
        (status = 400, description = "MALFORMED_JSON, INVALID_BODY", body = super::openapi::ErrorBody),
        (status = 404, description = "NOT_FOUND: unknown product", body = super::openapi::ErrorBody),
        (status = 409, description = "OUT_OF_STOCK (with `available`), IDEMPOTENCY_KEY_IN_USE", body = super::openapi::ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::openapi::ErrorBody),
        (status = 422, description = "INVALID_QUANTITY, INVALID_BUYER_ID, INVALID_IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_REUSED", body = super::openapi::ErrorBody),
    )
)]
async fn place_order(
    State(app): State<AppState>,
    headers: HeaderMap,
    Json(request): Json<PlaceOrderRequest>,
) -> Result<Response, ApiError> {
    let key = IdempotencyKey::from_headers("orders", &headers)?;
    let request_json = serde_json::to_value(&request).map_err(anyhow::Error::from)?;
    let order = request.parse(&app.config.orders)?;
    let Some(key) = key else {
        // Without a key there is nothing to store: place it with the product's other waiting
        // orders, or alone in one statement.
        let order = if app.config.orders.coalesce {
            app.coalescer.place(order).await.map_err(coalesce_error)??
        } else {
            let mut conn = app.pool.acquire().await?;
            store::place_order(&mut conn, &order)
                .await
                .on_constraint("stock_not_negative", out_of_stock)??
        };
        return Ok((StatusCode::CREATED, Json(order)).into_response());
    };
    let mut tx = match key.start(&app.pool, &request_json).await? {
        Begun::Execute(tx) => tx,
        Begun::Replay(stored) => return Ok(replay(stored.status, stored.body)),
    };
    let placed = store::place_order(&mut tx, &order)
        .await
        .on_constraint("stock_not_negative", out_of_stock)?;
    let (status, body) = match placed {
        Ok(order) => (
            StatusCode::CREATED,
            serde_json::to_value(order).map_err(anyhow::Error::from)?,
        ),
        Err(rejected) => {
            let error = ApiError::from(rejected);
            (error.status(), error.body())
        }
    };
    key.store(
        &mut tx,
        &request_json,
        status,
        &body,
        app.config.idempotency.ttl_hours,
    )
    .await?;
    tx.commit().await?;
    Ok(replay(status, body))
}

/// The schema's last line of defence fired: the statement's own guard should make this
/// unreachable, but if it fires the buyer still gets a 409, not a 500.
fn out_of_stock() -> ApiError {
    ApiError::OutOfStock { available: 0 }
}

fn coalesce_error(e: CoalesceError) -> ApiError {
    match e {
        CoalesceError::Sql(e) if matches!(*e, sqlx::Error::PoolTimedOut) => ApiError::Unavailable,
        CoalesceError::Sql(e) if is_stock_violation(&e) => out_of_stock(),
        other => ApiError::Internal(other.into()),
    }
}

fn is_stock_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.constraint() == Some("stock_not_negative"))
}

fn replay(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

#[utoipa::path(
    get, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = Order),
        (status = 400, description = "INVALID_PATH", body = super::openapi::ErrorBody),
        (status = 404, description = "NOT_FOUND", body = super::openapi::ErrorBody),
    )
)]
async fn get_order(
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<Order>, ApiError> {
    let mut conn = app.pool.acquire().await?;
    store::get_order(&mut conn, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("order not found".into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListOrdersQuery {
    product_id: Option<i64>,
    buyer_id: Option<String>,
    /// Page size, 1 to `orders.max_page_size`.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderPage {
    data: Vec<Order>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

#[utoipa::path(
    get, path = "/api/v1/orders", tag = "orders",
    params(ListOrdersQuery),
    responses(
        (status = 200, description = "Newest first", body = OrderPage),
        (status = 400, description = "INVALID_QUERY, INVALID_CURSOR", body = super::openapi::ErrorBody),
        (status = 422, description = "INVALID_LIMIT", body = super::openapi::ErrorBody),
    )
)]
async fn list_orders(
    State(app): State<AppState>,
    Query(query): Query<ListOrdersQuery>,
) -> Result<Json<OrderPage>, ApiError> {
    let config = &app.config.orders;
    let limit =
        super::pagination::limit(query.limit, config.default_page_size, config.max_page_size)?;
    let filter = OrderFilter {
        product_id: query.product_id,
        buyer_id: query.buyer_id,
        before_id: query
            .cursor
            .as_deref()
            .map(Cursor::parse)
            .transpose()?
            .map(|c| c.0),
    };
    let mut conn = app.pool.acquire().await?;
    let mut data = store::list_orders(&mut conn, &filter, limit + 1).await?;
    let next_cursor = super::pagination::next_cursor(&mut data, limit, |o| o.id);
    Ok(Json(OrderPage { data, next_cursor }))
}
