//! The OpenAPI document, generated from the handlers' annotations, served at
//! `/api/v1/openapi.json` with a browsable UI at `/docs`.

use axum::Router;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

/// The shape of every error response.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable upper-snake code, e.g. OUT_OF_STOCK.
    code: String,
    /// Human-readable explanation.
    message: String,
    /// The offending field, on 422 errors.
    field: Option<String>,
    /// Units left, on OUT_OF_STOCK.
    available: Option<i64>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "settle",
        description = "Flash-sale ordering and settlement jobs on Postgres.\n\n\
        Every error is `{\"error\": {\"code\", \"message\", …}}`. Unknown routes answer 404 NOT_FOUND, \
        wrong methods 405 METHOD_NOT_ALLOWED, bodies over the limit 413 PAYLOAD_TOO_LARGE, \
        non-JSON bodies 415 UNSUPPORTED_MEDIA_TYPE, an exhausted database pool 503 SERVICE_UNAVAILABLE."
    ),
    paths(
        super::products::create_product,
        super::products::get_product,
        super::products::restock,
        super::orders::place_order,
        super::orders::get_order,
        super::orders::list_orders,
        super::transactions::create_transactions,
        super::settlement_jobs::create_settlement_job,
        super::downloads::download,
        super::jobs::get_job,
        super::jobs::list_jobs,
        super::jobs::cancel_job,
        super::health::livez,
        super::health::readyz,
        super::metrics::scrape,
    ),
    components(schemas(ErrorBody, ErrorDetail, super::jobs::Job, super::jobs::JobPage))
)]
pub struct ApiDoc;

pub fn docs() -> Router {
    SwaggerUi::new("/docs")
        .url("/api/v1/openapi.json", ApiDoc::openapi())
        .into()
}
