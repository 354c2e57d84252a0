//! `/api/v1/products`: create, get, list, restock.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::{Int, Json, ListQuery, Path};
use super::idempotency::{KeyHeader, commit, replay, respond};
use super::openapi::ErrorBody;
use super::pagination::{NoFilters, Page, PageQuery};
use super::{AppState, Started};
use crate::idempotency::{self, Begun, IdempotencyKey};
use crate::orders::{self, NewProduct, store};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/products", post(create_product).get(list_products))
        .route("/api/v1/products/{id}", get(get_product))
        .route("/api/v1/products/{id}/restock", post(restock))
}

// A product as answered (a `///` here would change the schema's OpenAPI description).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Product)]
pub struct ProductBody {
    pub id: i64,
    pub name: String,
    /// Units left to sell.
    pub stock: i64,
    pub price_cents: i64,
    /// Units sold so far (`initial_stock + restocked = stock + sold`).
    pub sold: i64,
    pub initial_stock: i64,
    /// Units added by restocks so far.
    pub restocked: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<orders::Product> for ProductBody {
    fn from(p: orders::Product) -> Self {
        Self {
            id: p.id,
            name: p.name,
            stock: p.stock,
            price_cents: p.price_cents,
            sold: p.sold,
            initial_stock: p.initial_stock,
            restocked: p.restocked,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

/// `POST /api/v1/products` body, as received.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProductRequest {
    /// Not blank. Stored without its leading and trailing whitespace; `maxLength` counts the
    /// name as sent, that whitespace included.
    pub name: String,
    #[serde(deserialize_with = "super::extract::integer")]
    pub stock: i64,
    #[serde(deserialize_with = "super::extract::integer")]
    pub price_cents: i64,
}

/// `POST /api/v1/products/{id}/restock` body, as received.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestockRequest {
    #[serde(deserialize_with = "super::extract::integer")]
    pub quantity: i64,
}

#[utoipa::path(
    post, path = "/api/v1/products", tag = "products",
    params(KeyHeader),
    responses(
        (status = 201, description = "Created (a replay answers the first answer again)", body = ProductBody),
        (status = 409, description = "IDEMPOTENCY_KEY_IN_USE", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "INVALID_NAME, INVALID_STOCK, INVALID_PRICE, \
            INVALID_IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_REUSED", body = ErrorBody),
    )
)]
async fn create_product(
    State(app): State<AppState>,
    started: Started,
    key: KeyHeader,
    Json(request): Json<CreateProductRequest>,
) -> Result<Response, ApiError> {
    let key = key.scoped("products")?;
    let product = NewProduct::parse(&request.name, request.stock, request.price_cents)?;
    // The name as sent, not as stored (trimmed): a retry must send the same body, as Stripe
    // compares the parameters sent.
    let request =
        json!({"name": request.name, "stock": product.stock, "price_cents": product.price_cents});
    let created =
        async |conn: &mut PgConnection| Ok(Some(store::insert_product(conn, &product).await?));
    let answer = (key, &request, StatusCode::CREATED);
    write_product(&app, &started, answer, created).await
}

#[utoipa::path(
    get, path = "/api/v1/products/{id}", tag = "products",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = ProductBody),
    )
)]
async fn get_product(
    State(app): State<AppState>,
    Path(Int(id)): Path<Int>,
) -> Result<Json<ProductBody>, ApiError> {
    let mut conn = app.pool.acquire().await?;
    store::get_product(&mut conn, id)
        .await?
        .map(|p| Json(p.into()))
        .ok_or_else(product_not_found)
}

/// List products, newest first, with their stock.
#[utoipa::path(
    get, path = "/api/v1/products", tag = "products",
    params(PageQuery),
    responses(
        (status = 200, description = "Newest first", body = Page<ProductBody>),
    )
)]
async fn list_products(
    State(app): State<AppState>,
    ListQuery(NoFilters {}, page): ListQuery<NoFilters>,
) -> Result<Json<Page<ProductBody>>, ApiError> {
    let limit = page.limit(&app.config.pagination)?;
    let before = page.before()?;
    let mut conn = app.pool.acquire().await?;
    let rows = store::list_products(&mut conn, before, limit + 1).await?;
    Ok(Json(Page::by_id(rows, limit, |p| p.id)))
}

/// Add `quantity` units to the product's stock. Send an `Idempotency-Key` to retry safely: an
/// answer lost on the way (or a 503 `OUTCOME_UNKNOWN`) says nothing of whether the restock took
/// effect; a 503 `SERVICE_UNAVAILABLE` says it did not.
#[utoipa::path(
    post, path = "/api/v1/products/{id}/restock", tag = "products",
    params(("id" = i64, Path), KeyHeader),
    responses(
        (status = 200, description = "Restocked (a replay answers the first answer again)", body = ProductBody),
        (status = 409, description = "IDEMPOTENCY_KEY_IN_USE", body = ErrorBody),
        (status = 422, description = "INVALID_QUANTITY, STOCK_TOO_LARGE, INVALID_IDEMPOTENCY_KEY, \
            IDEMPOTENCY_KEY_REUSED", body = ErrorBody),
    )
)]
async fn restock(
    State(app): State<AppState>,
    started: Started,
    Path(Int(id)): Path<Int>,
    key: KeyHeader,
    Json(request): Json<RestockRequest>,
) -> Result<Response, ApiError> {
    let key = key.scoped("restock")?;
    let quantity = orders::restock_quantity(request.quantity)?;
    let request = json!({"product_id": id, "quantity": quantity});
    let restocked = async |conn: &mut PgConnection| {
        store::restock(conn, id, quantity)
            .await
            .map_err(|e| match &e {
                // bigint overflow of stock or restocked: refuse rather than 500.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("22003") => {
                    ApiError::invalid("STOCK_TOO_LARGE", "quantity", "stock would overflow")
                }
                _ => e.into(),
            })
    };
    let answer = (key, &request, StatusCode::OK);
    write_product(&app, &started, answer, restocked).await
}

/// Runs `write` in the request's transaction, under its Idempotency-Key when it sent one (a
/// request seen before is answered the first answer again), and answers the product it
/// returns with `status`, stored under the key in the same commit; `None` is 404 and an error
/// is answered as such, neither stored (a corrected retry may reuse the key).
async fn write_product(
    app: &AppState,
    started: &Started,
    (key, request, status): (Option<IdempotencyKey>, &Value, StatusCode),
    write: impl AsyncFnOnce(&mut PgConnection) -> Result<Option<orders::Product>, ApiError>,
) -> Result<Response, ApiError> {
    let mut tx = match idempotency::begin(key.as_ref(), &app.pool, request).await? {
        Begun::Execute(tx) => tx,
        Begun::Replay(stored) => return replay(stored),
    };
    let product = match write(&mut tx).await {
        Ok(Some(product)) => product,
        failed => {
            // Let go of the key now: dropped, the transaction would keep it until the
            // connection is next used, and a prompt retry would be told the key is in use.
            let _ = tx.rollback().await;
            return Err(failed.err().unwrap_or_else(product_not_found));
        }
    };
    let body = serde_json::to_value(ProductBody::from(product)).map_err(anyhow::Error::from)?;
    commit(app, started, key.as_ref(), tx, request, (status, &body)).await?;
    Ok(respond(status, body))
}

fn product_not_found() -> ApiError {
    ApiError::NotFound("product not found".into())
}
