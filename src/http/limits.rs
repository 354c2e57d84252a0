//! The OpenAPI document's limits and common answers, filled in from the same constants and
//! configuration the handlers enforce, so a client (or a schema-driven fuzzer) generating from
//! the document meets exactly the rules the server applies.
//!
//! Hand-written rather than `#[schema(max_length = …)]` attributes: utoipa's attributes take
//! literals only, and several limits are configuration (`orders.max_quantity`, page sizes, the
//! transactions batch). Rules spanning two fields (fee ≤ amount, from ≤ to within
//! `settlement.max_span_days`) have no JSON Schema form; their fields' descriptions state them,
//! as they state the days a date or `paid_at` may fall on (`format: date` also takes the year
//! 0000, `format: date-time` the first and last days). `tests/fuzz/schemathesis.toml` lists
//! these rules again.

use serde_json::{Value, json};

use settle_workers::JobState;

use crate::config::Config;
use crate::orders::{MAX_BUYER_ID_CHARS, MAX_NAME_CHARS, MAX_PRICE_CENTS, MAX_STOCK};
use crate::settlement::transactions::{MAX_EXTERNAL_ID_CHARS, MAX_MERCHANT_ID_CHARS};

/// Rust's `char::is_whitespace` set (Unicode White_Space), spelt out: regex engines' `\s`
/// differ from it and from each other.
const WHITE_SPACE: &str =
    r"\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// Not blank and without NUL (names and buyer ids).
fn not_blank_no_nul() -> String {
    format!(r"^[^\u0000]*[^{WHITE_SPACE}\u0000][^\u0000]*$")
}

/// Not blank and without control characters (`char::is_control`: Cc, U+0000–001F, U+007F–009F).
fn not_blank_no_control() -> String {
    let c = r"\u0000-\u001f\u007f-\u009f";
    format!(r"^[^{c}]*[^{WHITE_SPACE}{c}][^{c}]*$")
}

/// Visible ASCII only (external ids, idempotency keys).
const VISIBLE_ASCII: &str = r"^[!-~]+$";

/// Applies every limit and common answer to the serialized document; returns the
/// `schema.property` names it found no field for (none, unless a request type was renamed).
pub fn complete(doc: &mut Value, config: &Config) -> Vec<String> {
    let mut missing = Vec::new();
    let schemas = &mut doc["components"]["schemas"];
    // utoipa writes a generic page's items out inline, a copy of the item's schema without the
    // limits added below: each `Page_X` refers to `X` instead.
    let pages: Vec<String> = schemas
        .as_object()
        .map(|all| {
            let named = |name: &&String| {
                name.strip_prefix("Page_")
                    .is_some_and(|item| all.contains_key(item))
            };
            all.keys().filter(named).cloned().collect()
        })
        .unwrap_or_default();
    for page in pages {
        let item = format!("#/components/schemas/{}", &page["Page_".len()..]);
        schemas[&page]["properties"]["data"]["items"] = json!({ "$ref": item });
    }
    for (schema, property, limits) in field_limits(config) {
        match schemas.pointer_mut(&format!("/{schema}/properties/{property}")) {
            Some(field) => merge(field, limits),
            None => missing.push(format!("{schema}.{property}")),
        }
    }
    let batch = config.settlement.max_transactions_per_request;
    schemas["TransactionBatch"] = json!({
        "description": "One transaction, or an array of them.",
        "oneOf": [
            {"$ref": "#/components/schemas/TransactionInput"},
            {"type": "array", "items": {"$ref": "#/components/schemas/TransactionInput"},
             "minItems": 1, "maxItems": batch},
        ]
    });
    let Some(paths) = doc["paths"].as_object_mut() else {
        return missing;
    };
    for (path, operations) in paths.iter_mut() {
        let Some(operations) = operations.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            complete_operation(path, operation, config);
        }
    }
    missing
}

/// `states` as the API writes them (`JobState::as_api_str`).
fn job_states(states: &[JobState]) -> Value {
    json!({"enum": states.iter().map(|s| s.as_api_str()).collect::<Vec<_>>()})
}

/// `(schema, property, limits)` for every request field the handlers check, and every answer
/// field whose values are a fixed set or range.
fn field_limits(config: &Config) -> Vec<(&'static str, &'static str, Value)> {
    let text =
        |max: usize, pattern: String| json!({"minLength": 1, "maxLength": max, "pattern": pattern});
    let range = |min: i64, max: i64| json!({"minimum": min, "maximum": max});
    vec![
        (
            "CreateProductRequest",
            "name",
            text(MAX_NAME_CHARS, not_blank_no_nul()),
        ),
        ("CreateProductRequest", "stock", range(0, MAX_STOCK)),
        (
            "CreateProductRequest",
            "price_cents",
            range(0, MAX_PRICE_CENTS),
        ),
        ("RestockRequest", "quantity", range(1, MAX_STOCK)),
        (
            "PlaceOrderRequest",
            "quantity",
            range(1, config.orders.max_quantity.into()),
        ),
        (
            "PlaceOrderRequest",
            "buyer_id",
            text(MAX_BUYER_ID_CHARS, not_blank_no_nul()),
        ),
        (
            "TransactionInput",
            "merchant_id",
            text(MAX_MERCHANT_ID_CHARS, not_blank_no_control()),
        ),
        (
            "TransactionInput",
            "external_id",
            text(MAX_EXTERNAL_ID_CHARS, VISIBLE_ASCII.into()),
        ),
        ("TransactionInput", "amount_cents", range(0, i64::MAX)),
        ("TransactionInput", "fee_cents", range(0, i64::MAX)),
        (
            "TransactionInput",
            "status",
            json!({"enum": ["PAID", "PENDING", "FAILED", "REFUNDED"]}),
        ),
        (
            "TransactionInput",
            "paid_at",
            json!({"format": "date-time"}),
        ),
        (
            "DateRangeInput",
            "from",
            json!({"format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"}),
        ),
        (
            "DateRangeInput",
            "to",
            json!({"format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"}),
        ),
        ("Job", "status", job_states(&JobState::ALL)),
        ("Job", "progress", range(0, 100)),
        (
            "JobAccepted",
            "status",
            job_states(&[JobState::Queued, JobState::Cancelling, JobState::Cancelled]),
        ),
    ]
}

/// The parameters' limits, the transactions body, and the answers every operation of its kind
/// can give.
fn complete_operation(path: &str, operation: &mut Value, config: &Config) {
    if let Some(parameters) = operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
    {
        for parameter in parameters {
            let kind = &parameter["schema"]["type"];
            let text = kind == "string"
                || kind
                    .as_array()
                    .is_some_and(|t| t.contains(&json!("string")));
            let limits = match parameter["name"].as_str() {
                Some("cursor") if path == "/api/v1/settlements" => {
                    json!({"pattern": super::settlements::CURSOR_PATTERN})
                }
                Some("limit") => json!({"minimum": 1, "maximum": config.pagination.max_page_size}),
                Some("status") => job_states(&JobState::ALL),
                // The last id of the page before: what `next_cursor` returns.
                Some("cursor") => json!({"pattern": super::pagination::ID_CURSOR_PATTERN}),
                Some("Idempotency-Key") => json!({
                    "minLength": 1,
                    "maxLength": crate::idempotency::MAX_KEY_CHARS,
                    "pattern": VISIBLE_ASCII,
                }),
                Some("from" | "to") => json!({"format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"}),
                // Every other text filter: anything but NUL (see `extract::Query`).
                _ if text && parameter["in"] == "query" => json!({"pattern": r"^[^\u0000]*$"}),
                _ => continue,
            };
            merge(&mut parameter["schema"], limits);
        }
    }
    let body = operation.pointer_mut("/requestBody/content/application~1json/schema/$ref");
    if let Some(body) = body.filter(|r| *r == "#/components/schemas/TransactionInput") {
        *body = json!("#/components/schemas/TransactionBatch");
    }
    let takes_body = operation.get("requestBody").is_some();
    let paged = operation["parameters"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["name"] == "cursor"));
    let mut common = Vec::new();
    if path.contains('{') {
        // The parameter in the path (`extract::Path`: an id, or a file name that must be
        // UTF-8) and the row it names.
        let invalid = match takes_body {
            true => "MALFORMED_JSON, INVALID_BODY, INVALID_PATH",
            false => "INVALID_PATH",
        };
        common.push(("400", invalid));
        common.push(("404", "NOT_FOUND"));
    }
    if paged {
        // Every list's page parameters (`pagination::PageQuery`); a list with filters of its
        // own states its 422 itself.
        common.push(("400", "INVALID_QUERY, INVALID_CURSOR"));
        common.push(("422", "INVALID_LIMIT"));
    }
    // The writes that take a key commit through `idempotency::commit`, which finds out what a
    // failed commit did (orders list their own 503).
    let keyed = operation["parameters"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["name"] == "Idempotency-Key"));
    if keyed {
        common.push((
            "503",
            "SERVICE_UNAVAILABLE: nothing was done: the database is unreachable or busy, or \
            the request ran past http.request_timeout_ms; retrying is safe. \
            OUTCOME_UNKNOWN: the database connection failed during the commit, or the request ran \
            past http.request_timeout_ms while committing, and the service could not find out \
            whether the write took effect; a retry with the same Idempotency-Key answers what was \
            done (or does it, if nothing was), while a retry without one may do it twice. A commit \
            whose reply was lost but which took effect is answered as done",
        ));
    }
    if path.starts_with("/api/v1/") || path.starts_with("/downloads/") {
        common.push((
            "503",
            "SERVICE_UNAVAILABLE: nothing was done: the database is unreachable or busy, or the \
             request ran past http.request_timeout_ms; retry later",
        ));
        common.push((
            "401",
            "UNAUTHENTICATED: no, unknown or revoked bearer token",
        ));
        common.push(("403", "FORBIDDEN: the token's role may not do this"));
    }
    if takes_body {
        common.push(("400", "MALFORMED_JSON, INVALID_BODY"));
        common.push((
            "415",
            "UNSUPPORTED_MEDIA_TYPE: the body is not application/json",
        ));
    }
    let responses = &mut operation["responses"];
    for (status, description) in common {
        if responses.get(status).is_none() {
            responses[status] = error_response(description);
        }
    }
    if takes_body {
        // The limit as configured, which also bounds a list that a count limits too (a full
        // array of transactions with long ids may be over it).
        let too_large = format!(
            "PAYLOAD_TOO_LARGE: the body is over http.max_body_bytes ({} bytes here)",
            config.http.max_body_bytes
        );
        responses["413"] = error_response(&too_large);
    }
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// Copies `limits`' keys into `schema` (an object).
fn merge(schema: &mut Value, limits: Value) {
    if let (Some(schema), Value::Object(limits)) = (schema.as_object_mut(), limits) {
        schema.extend(limits);
    }
}
