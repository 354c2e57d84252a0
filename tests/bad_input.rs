//! A table of bad inputs: each gets the right 4xx with the error shape, never a 5xx, and
//! changes nothing.

mod common;

use common::{TestApp, assert_error, assert_refused, spawn_app, status_and_json};
use serde_json::{Value, json};

/// A request the API must refuse, and how.
struct Case {
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    /// Sent as is: malformed JSON is a case too.
    body: String,
    status: u16,
    code: &'static str,
}

const ORDERS: &str = "/api/v1/orders";
const PRODUCTS: &str = "/api/v1/products";

/// A POST of `body` as JSON (raw text or a value).
fn post(path: impl Into<String>, body: impl ToString, status: u16, code: &'static str) -> Case {
    Case {
        method: "POST",
        path: path.into(),
        content_type: Some("application/json"),
        body: body.to_string(),
        status,
        code,
    }
}

/// A `method` request without a body.
fn bare(method: &'static str, path: impl Into<String>, status: u16, code: &'static str) -> Case {
    Case {
        content_type: None,
        method,
        ..post(path, "", status, code)
    }
}

fn get(path: impl Into<String>, status: u16, code: &'static str) -> Case {
    bare("GET", path, status, code)
}

/// Orders that must be refused: bodies that are not JSON, not an order, or an order the
/// rules refuse.
fn order_cases(product: i64) -> Vec<Case> {
    let order =
        |q: Value, buyer: Value| json!({"product_id": product, "quantity": q, "buyer_id": buyer});
    let invalid = |body: Value| post(ORDERS, body, 400, "INVALID_BODY");
    let quantity = |q: Value| post(ORDERS, order(q, json!("b")), 422, "INVALID_QUANTITY");
    let buyer = |b: Value| post(ORDERS, order(json!(1), b), 422, "INVALID_BUYER_ID");
    let huge = format!("{{\"buyer_id\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
    vec![
        post(ORDERS, "{\"product_id\": 1,", 400, "MALFORMED_JSON"),
        post(ORDERS, "not json", 400, "MALFORMED_JSON"),
        post(ORDERS, "", 400, "MALFORMED_JSON"),
        invalid(json!([])),
        invalid(order(json!("1"), json!("b"))),
        invalid(order(json!(1.5), json!("b"))),
        invalid(order(json!(1), json!(7))),
        invalid(order(json!(null), json!("b"))),
        invalid(json!({"product_id": product, "quantity": 1})),
        invalid(json!({"product_id": product, "quantity": 1, "buyer_id": "b", "extra": 1})),
        invalid(order(json!(1e30), json!("b"))),
        // A fraction too fine for a float to hold is still a fraction.
        post(
            ORDERS,
            order(json!(1), json!("b")).to_string().replacen(
                r#""quantity":1"#,
                r#""quantity":1.0000000000000001"#,
                1,
            ),
            400,
            "INVALID_BODY",
        ),
        quantity(json!(0)),
        quantity(json!(-3)),
        quantity(json!(1001)),
        quantity(json!(i64::MAX)),
        buyer(json!("")),
        buyer(json!("   ")),
        buyer(json!("x".repeat(5 * 1024))),
        post(
            ORDERS,
            json!({"product_id": 999_999, "quantity": 1, "buyer_id": "b"}),
            404,
            "NOT_FOUND",
        ),
        post(
            ORDERS,
            json!({"product_id": -1, "quantity": 1, "buyer_id": "b"}),
            404,
            "NOT_FOUND",
        ),
        post(ORDERS, order(json!(11), json!("b")), 409, "OUT_OF_STOCK"),
        Case {
            content_type: None,
            ..post(
                ORDERS,
                order(json!(1), json!("b")),
                415,
                "UNSUPPORTED_MEDIA_TYPE",
            )
        },
        post(ORDERS, huge, 413, "PAYLOAD_TOO_LARGE"),
    ]
}

/// Reads, paths and methods that must be refused.
fn path_cases(product: i64) -> Vec<Case> {
    vec![
        get("/api/v1/orders/abc", 400, "INVALID_PATH"),
        get("/api/v1/orders/99999999999999999999", 400, "INVALID_PATH"),
        get("/api/v1/orders/424242", 404, "NOT_FOUND"),
        get("/api/v1/orders?limit=0", 422, "INVALID_LIMIT"),
        get("/api/v1/orders?limit=x", 400, "INVALID_QUERY"),
        get("/api/v1/orders?cursor=zz", 400, "INVALID_CURSOR"),
        // A cursor the document's pattern refuses, though it would name a position.
        get("/api/v1/orders?cursor=05", 400, "INVALID_CURSOR"),
        get(
            "/api/v1/products?cursor=9223372036854775807",
            400,
            "INVALID_CURSOR",
        ),
        get(
            "/api/v1/jobs?cursor=0000000000000000000002",
            400,
            "INVALID_CURSOR",
        ),
        get(
            "/api/v1/settlements?cursor=20089_6D2D31",
            400,
            "INVALID_CURSOR",
        ),
        // An empty text filter matches no row: refused, not answered with an empty page.
        get("/api/v1/orders?buyer_id=", 422, "INVALID_BUYER_ID"),
        get("/api/v1/jobs?kind=", 422, "INVALID_KIND"),
        get(
            "/api/v1/settlements?merchant_id=",
            422,
            "INVALID_MERCHANT_ID",
        ),
        // A parameter the route does not take (a misspelt filter) would answer every row.
        get("/api/v1/jobs?state=failed", 400, "INVALID_QUERY"),
        get("/api/v1/products?limit=1&sort=asc", 400, "INVALID_QUERY"),
        get("/api/v1/products/1.5", 400, "INVALID_PATH"),
        get("/api/v1/products/77777", 404, "NOT_FOUND"),
        bare(
            "DELETE",
            format!("{PRODUCTS}/{product}"),
            405,
            "METHOD_NOT_ALLOWED",
        ),
        Case {
            method: "PUT",
            ..post(ORDERS, "{}", 405, "METHOD_NOT_ALLOWED")
        },
        get("/api/v1/nothing-here", 404, "NOT_FOUND"),
        // The docs' routes answer in the same shape.
        bare("POST", "/api/v1/openapi.json", 405, "METHOD_NOT_ALLOWED"),
        bare("DELETE", "/docs/index.html", 405, "METHOD_NOT_ALLOWED"),
        get("/docs/nothing-here", 404, "NOT_FOUND"),
    ]
}

/// Products and restocks that must be refused.
fn product_cases(product: i64) -> Vec<Case> {
    let restock = format!("{PRODUCTS}/{product}/restock");
    let quantity = |q: Value| post(&restock, json!({"quantity": q}), 422, "INVALID_QUANTITY");
    vec![
        post(
            PRODUCTS,
            json!({"name": "", "stock": 1, "price_cents": 1}),
            422,
            "INVALID_NAME",
        ),
        // maxLength counts the name as sent, the whitespace trimmed before storing included.
        post(
            PRODUCTS,
            json!({"name": format!("{}     ", "n".repeat(200)), "stock": 1, "price_cents": 1}),
            422,
            "INVALID_NAME",
        ),
        post(
            PRODUCTS,
            json!({"name": "n", "stock": -1, "price_cents": 1}),
            422,
            "INVALID_STOCK",
        ),
        post(
            PRODUCTS,
            json!({"name": "n", "stock": 1, "price_cents": -1}),
            422,
            "INVALID_PRICE",
        ),
        post(
            PRODUCTS,
            json!({"name": "n", "stock": "many", "price_cents": 1}),
            400,
            "INVALID_BODY",
        ),
        quantity(json!(0)),
        quantity(json!(-5)),
        quantity(json!(10_000_000_000_i64)),
        post(
            "/api/v1/products/abc/restock",
            json!({"quantity": 1}),
            400,
            "INVALID_PATH",
        ),
        post(
            "/api/v1/products/31337/restock",
            json!({"quantity": 1}),
            404,
            "NOT_FOUND",
        ),
    ]
}

/// Sends `case` and checks the answer: its status and code, in the error shape, with a
/// request id.
async fn check(app: &TestApp, case: Case) {
    let Case {
        method,
        path,
        content_type,
        body,
        status,
        code,
    } = case;
    let mut request = app
        .http
        .request(method.parse().unwrap(), app.url(&path))
        .body(body.clone());
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.send().await.expect("sent");
    assert!(
        response.headers().contains_key("x-request-id"),
        "{method} {path}: every response carries a request id"
    );
    let (got, error) = status_and_json(response).await;
    let shown = &body[..body.len().min(80)];
    assert_eq!(got, status, "{method} {path} {shown}: {error}");
    assert_error(&error, code);
}

/// Bodies written as arrays of a request's fields in order, which serde would take for the
/// struct: the document says object, and so does the API.
fn array_cases(product: i64) -> Vec<Case> {
    let array = |path: &str, body: Value| post(path, body, 400, "INVALID_BODY");
    vec![
        array(PRODUCTS, json!(["p", 10, 100])),
        array(&format!("{PRODUCTS}/{product}/restock"), json!([5])),
        array(ORDERS, json!([product, 1, "b"])),
        array(
            "/api/v1/jobs/settlement",
            json!(["2025-01-01", "2025-01-01"]),
        ),
    ]
}

#[tokio::test]
async fn bad_inputs_get_a_clear_4xx_and_change_nothing() {
    let app = spawn_app().await;
    let product = app.product(10, 100).await;
    for cases in [
        order_cases(product),
        path_cases(product),
        product_cases(product),
        array_cases(product),
    ] {
        for case in cases {
            check(&app, case).await;
        }
    }
    let (_, after) = app.get(&format!("/api/v1/products/{product}")).await;
    assert_eq!(
        (after["stock"].as_i64(), after["sold"].as_i64()),
        (Some(10), Some(0))
    );
    for (table, rows) in [("orders", 0), ("products", 1), ("jobs", 0)] {
        let count = format!("select count(*) from {table}");
        assert_eq!(common::scalar(&app.pool, &count).await, rows, "{table}");
    }
}

#[tokio::test]
async fn health_and_docs_are_served() {
    let app = spawn_app().await;
    assert_eq!(app.get("/livez").await.0, 200);
    let (status, ready) = app.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ok")));
    let (status, spec) = app.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/api/v1/orders",
        "/api/v1/orders/{id}",
        "/api/v1/products",
        "/api/v1/products/{id}",
        "/api/v1/products/{id}/restock",
        "/api/v1/transactions",
        "/api/v1/jobs",
        "/api/v1/jobs/{id}",
        "/api/v1/jobs/{id}/cancel",
        "/api/v1/jobs/settlement",
        "/livez",
        "/readyz",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} documented");
    }
    let spec_text = spec.to_string();
    for code in [
        "OUT_OF_STOCK",
        "IDEMPOTENCY_KEY_REUSED",
        "IDEMPOTENCY_KEY_IN_USE",
        "INVALID_QUANTITY",
        "INVALID_BUYER_ID",
        "PAYLOAD_TOO_LARGE",
        "MALFORMED_JSON",
        "METHOD_NOT_ALLOWED",
        "JOB_FINISHED",
        "NOT_FOUND",
    ] {
        assert!(spec_text.contains(code), "{code} documented");
    }
    // The body limit as configured, where a full array of transactions may meet it first.
    let limit = app.config.http.max_body_bytes;
    assert_eq!(
        spec["paths"]["/api/v1/transactions"]["post"]["responses"]["413"]["description"],
        format!("PAYLOAD_TOO_LARGE: the body is over http.max_body_bytes ({limit} bytes here)")
    );
    for path in [
        "/api/v1/orders",
        "/api/v1/transactions",
        "/api/v1/jobs/settlement",
    ] {
        let params = spec["paths"][path]["post"]["parameters"]
            .as_array()
            .unwrap();
        let key = params.iter().find(|p| p["name"] == "Idempotency-Key");
        let key = key.unwrap_or_else(|| panic!("{path} documents Idempotency-Key"));
        assert_eq!(
            (&key["in"], &key["required"]),
            (&json!("header"), &json!(false))
        );
        assert!(
            key["description"]
                .as_str()
                .unwrap()
                .contains("255 characters")
        );
    }
    let docs = app.http.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
}

/// A parameter a list does not take is named back with the ones it does, so a misspelt filter
/// is found at once instead of answering every row.
#[tokio::test]
async fn an_unknown_query_parameter_is_named_with_the_known_ones() {
    let app = spawn_app().await;
    let (status, body) = app.get("/api/v1/jobs?limit=5&state=failed").await;
    assert_refused((status, body.clone()), 400, "INVALID_QUERY");
    let message = body["error"]["message"].as_str().unwrap();
    for name in ["`state`", "status", "kind", "limit", "cursor"] {
        assert!(message.contains(name), "{name}: {message}");
    }
    let (status, _) = app.get("/api/v1/jobs?limit=5&status=FAILED").await;
    assert_eq!(status, 200);
}
