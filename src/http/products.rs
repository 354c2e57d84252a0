//! `/api/v1/products`: create, get, restock.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::AppState;
use super::error::ApiError;
use super::extract::{Json, Path};
use super::openapi::ErrorBody;
use crate::orders::store;
use crate::orders::{CreateProductRequest, Product, RestockRequest};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/products", post(create_product))
        .route("/api/v1/products/{id}", get(get_product))
        .route("/api/v1/products/{id}/restock", post(restock))
}

#[utoipa::path(
    post, path = "/api/v1/products", tag = "products",
    request_body = CreateProductRequest,
    responses(
        (status = 201, body = Product),
        (status = 400, description = "MALFORMED_JSON, INVALID_BODY", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "INVALID_NAME, INVALID_STOCK, INVALID_PRICE", body = ErrorBody),
    )
)]
async fn create_product(
    State(app): State<AppState>,
    Json(request): Json<CreateProductRequest>,
) -> Result<(StatusCode, Json<Product>), ApiError> {
    let product = request.parse()?;
    let mut conn = app.pool.acquire().await?;
    let created = store::insert_product(&mut conn, &product).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(
    get, path = "/api/v1/products/{id}", tag = "products",
    params(("id" = i64, Path)),
    responses(
        (status = 200, body = Product),
        (status = 400, description = "INVALID_PATH", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    )
)]
async fn get_product(
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<Product>, ApiError> {
    let mut conn = app.pool.acquire().await?;
    store::get_product(&mut conn, id)
        .await?
        .map(Json)
        .ok_or_else(product_not_found)
}

#[utoipa::path(
    post, path = "/api/v1/products/{id}/restock", tag = "products",
    params(("id" = i64, Path)),
    request_body = RestockRequest,
    responses(
        (status = 200, body = Product),
        (status = 400, description = "MALFORMED_JSON, INVALID_BODY, INVALID_PATH", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
        (status = 422, description = "INVALID_QUANTITY, STOCK_TOO_LARGE", body = ErrorBody),
    )
)]
async fn restock(
    State(app): State<AppState>,
    Path(id): Path<i64>,
    Json(request): Json<RestockRequest>,
) -> Result<Json<Product>, ApiError> {
    let quantity = request.parse()?;
    let mut conn = app.pool.acquire().await?;
    store::restock(&mut conn, id, quantity)
        .await
        .map_err(|e| match &e {
            // bigint overflow of stock or restocked: refuse rather than 500.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("22003") => {
                ApiError::invalid("STOCK_TOO_LARGE", "quantity", "stock would overflow")
            }
            _ => e.into(),
        })?
        .map(Json)
        .ok_or_else(product_not_found)
}

fn product_not_found() -> ApiError {
    ApiError::NotFound("product not found".into())
}
