//! The OpenAPI document, generated from the handlers' annotations, served at
//! `/api/v1/openapi.json` with a browsable UI at `/docs`.

use axum::Router;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use super::auth::SecurityAddon;
use crate::config::Config;

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
    /// The position of the offending element in a batch of transactions (a 422 on one of its
    /// fields, or TRANSACTION_CONFLICT).
    index: Option<i64>,
    /// On TRANSACTION_CONFLICT: the transaction's merchant.
    merchant_id: Option<String>,
    /// On TRANSACTION_CONFLICT: the transaction's external id.
    external_id: Option<String>,
    /// On ORDER_OUTCOME_UNKNOWN: the id the order has if it was placed.
    order_id: Option<i64>,
    /// Units left, on OUT_OF_STOCK.
    available: Option<i64>,
    /// The job's current status, on JOB_NOT_RETRYABLE.
    status: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "settle",
        description = "Flash-sale ordering and settlement jobs on Postgres.\n\n\
        Every error is `{\"error\": {\"code\", \"message\", …}}`. Unknown routes answer 404 NOT_FOUND, \
        wrong methods 405 METHOD_NOT_ALLOWED, bodies over the limit 413 PAYLOAD_TOO_LARGE, \
        non-JSON bodies 415 UNSUPPORTED_MEDIA_TYPE, an exhausted database pool 503 SERVICE_UNAVAILABLE.\n\n\
        Every /api/v1 operation and the CSV download need `Authorization: Bearer <token>` \
        (`settle tokens create`): 401 UNAUTHENTICATED without a live token, 403 FORBIDDEN when \
        its role (admin, shop, ingest, merchant) may not call the operation."
    ),
    paths(
        super::products::create_product,
        super::products::get_product,
        super::products::list_products,
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
        super::jobs::retry_job,
        super::health::livez,
        super::health::readyz,
        super::settlements::list_settlements,
        super::metrics::scrape,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        super::jobs::Job,
        super::jobs::JobAttemptError
    )),
    modifiers(&SecurityAddon)
)]
pub struct ApiDoc;

/// The document with the limits `config` sets (see `limits` below).
pub fn document(config: &Config) -> utoipa::openapi::OpenApi {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
    let missing = super::limits::complete(&mut doc, config);
    debug_assert!(
        missing.is_empty(),
        "limits for fields not in the document: {missing:?}"
    );
    serde_json::from_value(doc).expect("the completed document is still a document")
}

pub fn docs(config: &Config) -> Router {
    let docs: Router = SwaggerUi::new("/docs")
        .url("/api/v1/openapi.json", document(config))
        .into();
    // The UI answers a file it does not have with an empty 404: give it the API's error shape.
    docs.layer(axum::middleware::map_response(
        async |response: axum::response::Response| {
            if response.status() == axum::http::StatusCode::NOT_FOUND {
                let missing = super::error::ApiError::NotFound("no such file".into());
                return axum::response::IntoResponse::into_response(missing);
            }
            response
        },
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_limit_finds_its_field() {
        let config = Config::from_figment(Config::defaults()).expect("default config");
        let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("serializes");
        assert_eq!(
            super::super::limits::complete(&mut doc, &config),
            Vec::<String>::new()
        );
        let name = &doc["components"]["schemas"]["CreateProductRequest"]["properties"]["name"];
        assert_eq!(name["maxLength"], crate::orders::MAX_NAME_CHARS);
        // A file name in the path that is not UTF-8 (`%FF.csv`) is refused as for an id.
        let download = &doc["paths"]["/downloads/{job_id}.csv"]["get"]["responses"];
        assert!(download.get("400").is_some(), "{download}");
    }

    /// What the handlers refuse beyond a field's format, and the values an answer can hold,
    /// are in the document: a client generating from it meets no undocumented rule.
    #[test]
    fn ranges_and_job_states_are_documented() {
        let config = Config::from_figment(Config::defaults()).expect("default config");
        let doc = serde_json::to_value(document(&config)).expect("serializes");
        let field = |schema: &str, property: &str| {
            doc["components"]["schemas"][schema]["properties"][property].clone()
        };
        let states = [
            "QUEUED",
            "RUNNING",
            "CANCELLING",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
        ];
        assert_eq!(field("Job", "status")["enum"], json!(states));
        let accepted = ["QUEUED", "CANCELLING", "CANCELLED"];
        assert_eq!(field("JobAccepted", "status")["enum"], json!(accepted));
        let progress = field("Job", "progress");
        assert_eq!([&progress["minimum"], &progress["maximum"]], [0, 100]);
        // A page's items are the item's schema itself, limits included (utoipa copied them).
        for (page, item) in [("Page_Job", "Job"), ("Page_Settlement", "Settlement")] {
            let items = &field(page, "data")["items"];
            assert_eq!(
                items["$ref"],
                format!("#/components/schemas/{item}"),
                "{page}"
            );
        }
        let paid_at = field("TransactionInput", "paid_at").to_string();
        for bound in ["0001-01-02T00:00:00Z", "9999-12-31T00:00:00Z"] {
            assert!(paid_at.contains(bound), "{paid_at}");
        }
        let list = &doc["paths"]["/api/v1/settlements"]["get"]["parameters"];
        let query = |name| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .cloned()
        };
        for day in [
            field("DateRangeInput", "from"),
            field("DateRangeInput", "to"),
            query("from").expect("from"),
            query("to").expect("to"),
        ] {
            assert!(day.to_string().contains("years 0001 to 9999"), "{day}");
        }
    }

    /// Every write that takes a key answers OUTCOME_UNKNOWN when its commit's outcome is lost.
    #[test]
    fn keyed_writes_document_an_unknown_outcome() {
        let config = Config::from_figment(Config::defaults()).expect("default config");
        let doc = serde_json::to_value(document(&config)).expect("serializes");
        for path in [
            "/api/v1/products",
            "/api/v1/products/{id}/restock",
            "/api/v1/transactions",
            "/api/v1/jobs/settlement",
        ] {
            let answer = doc["paths"][path]["post"]["responses"]["503"]["description"].to_string();
            assert!(answer.contains("OUTCOME_UNKNOWN"), "{path}: {answer}");
        }
    }
}
