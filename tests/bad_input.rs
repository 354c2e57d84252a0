//! A table of bad inputs: each gets the right 4xx with the error shape, never a 5xx, and
//! changes nothing.

mod common;

use common::{assert_error, spawn_app, status_and_json};
use serde_json::json;

/// (method, path, content-type, raw body, expected status, expected code)
type Case = (
    &'static str,
    String,
    Option<&'static str>,
    String,
    u16,
    &'static str,
);

#[tokio::test]
async fn bad_inputs_get_a_clear_4xx_and_change_nothing() {
    let app = spawn_app().await;
    let product = app.product(10, 100).await;
    let order = |q: serde_json::Value, buyer: serde_json::Value| {
        json!({"product_id": product, "quantity": q, "buyer_id": buyer}).to_string()
    };
    let json_ct = Some("application/json");
    let orders = || "/api/v1/orders".to_owned();
    let cases: Vec<Case> = vec![
        (
            "POST",
            orders(),
            json_ct,
            "{\"product_id\": 1,".into(),
            400,
            "MALFORMED_JSON",
        ),
        (
            "POST",
            orders(),
            json_ct,
            "not json".into(),
            400,
            "MALFORMED_JSON",
        ),
        ("POST", orders(), json_ct, "".into(), 400, "MALFORMED_JSON"),
        ("POST", orders(), json_ct, "[]".into(), 400, "INVALID_BODY"),
        (
            "POST",
            orders(),
            json_ct,
            order(json!("1"), json!("b")),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(1.5), json!("b")),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(1), json!(7)),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(null), json!("b")),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            json!({"product_id": product, "quantity": 1}).to_string(),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            json!({"product_id": product, "quantity": 1, "buyer_id": "b", "extra": 1}).to_string(),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(1e30), json!("b")),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(0), json!("b")),
            422,
            "INVALID_QUANTITY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(-3), json!("b")),
            422,
            "INVALID_QUANTITY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(1001), json!("b")),
            422,
            "INVALID_QUANTITY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(i64::MAX), json!("b")),
            422,
            "INVALID_QUANTITY",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(1), json!("")),
            422,
            "INVALID_BUYER_ID",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(1), json!("   ")),
            422,
            "INVALID_BUYER_ID",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(1), json!("x".repeat(5 * 1024))),
            422,
            "INVALID_BUYER_ID",
        ),
        (
            "POST",
            orders(),
            json_ct,
            json!({"product_id": 999_999, "quantity": 1, "buyer_id": "b"}).to_string(),
            404,
            "NOT_FOUND",
        ),
        (
            "POST",
            orders(),
            json_ct,
            json!({"product_id": -1, "quantity": 1, "buyer_id": "b"}).to_string(),
            404,
            "NOT_FOUND",
        ),
        (
            "POST",
            orders(),
            json_ct,
            order(json!(11), json!("b")),
            409,
            "OUT_OF_STOCK",
        ),
        (
            "POST",
            orders(),
            None,
            order(json!(1), json!("b")),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "POST",
            orders(),
            json_ct,
            format!("{{\"buyer_id\": \"{}\"}}", "x".repeat(2 * 1024 * 1024)),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "GET",
            "/api/v1/orders/abc".into(),
            None,
            String::new(),
            400,
            "INVALID_PATH",
        ),
        (
            "GET",
            "/api/v1/orders/99999999999999999999".into(),
            None,
            String::new(),
            400,
            "INVALID_PATH",
        ),
        (
            "GET",
            "/api/v1/orders/424242".into(),
            None,
            String::new(),
            404,
            "NOT_FOUND",
        ),
        (
            "GET",
            "/api/v1/orders?limit=0".into(),
            None,
            String::new(),
            422,
            "INVALID_LIMIT",
        ),
        (
            "GET",
            "/api/v1/orders?limit=x".into(),
            None,
            String::new(),
            400,
            "INVALID_QUERY",
        ),
        (
            "GET",
            "/api/v1/orders?cursor=zz".into(),
            None,
            String::new(),
            400,
            "INVALID_CURSOR",
        ),
        (
            "GET",
            "/api/v1/products/1.5".into(),
            None,
            String::new(),
            400,
            "INVALID_PATH",
        ),
        (
            "GET",
            "/api/v1/products/77777".into(),
            None,
            String::new(),
            404,
            "NOT_FOUND",
        ),
        (
            "DELETE",
            format!("/api/v1/products/{product}"),
            None,
            String::new(),
            405,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "PUT",
            orders(),
            json_ct,
            "{}".into(),
            405,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "GET",
            "/api/v1/nothing-here".into(),
            None,
            String::new(),
            404,
            "NOT_FOUND",
        ),
        (
            "POST",
            "/api/v1/products".into(),
            json_ct,
            json!({"name": "", "stock": 1, "price_cents": 1}).to_string(),
            422,
            "INVALID_NAME",
        ),
        (
            "POST",
            "/api/v1/products".into(),
            json_ct,
            json!({"name": "n", "stock": -1, "price_cents": 1}).to_string(),
            422,
            "INVALID_STOCK",
        ),
        (
            "POST",
            "/api/v1/products".into(),
            json_ct,
            json!({"name": "n", "stock": 1, "price_cents": -1}).to_string(),
            422,
            "INVALID_PRICE",
        ),
        (
            "POST",
            "/api/v1/products".into(),
            json_ct,
            json!({"name": "n", "stock": "many", "price_cents": 1}).to_string(),
            400,
            "INVALID_BODY",
        ),
        (
            "POST",
            format!("/api/v1/products/{product}/restock"),
            json_ct,
            json!({"quantity": 0}).to_string(),
            422,
            "INVALID_QUANTITY",
        ),
        (
            "POST",
            format!("/api/v1/products/{product}/restock"),
            json_ct,
            json!({"quantity": -5}).to_string(),
            422,
            "INVALID_QUANTITY",
        ),
        (
            "POST",
            format!("/api/v1/products/{product}/restock"),
            json_ct,
            json!({"quantity": 10_000_000_000_i64}).to_string(),
            422,
            "INVALID_QUANTITY",
        ),
        (
            "POST",
            "/api/v1/products/abc/restock".into(),
            json_ct,
            json!({"quantity": 1}).to_string(),
            400,
            "INVALID_PATH",
        ),
        (
            "POST",
            "/api/v1/products/31337/restock".into(),
            json_ct,
            json!({"quantity": 1}).to_string(),
            404,
            "NOT_FOUND",
        ),
    ];
    for (method, path, content_type, body, status, code) in cases {
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
    let (_, after) = app.get(&format!("/api/v1/products/{product}")).await;
    assert_eq!(
        (after["stock"].as_i64(), after["sold"].as_i64()),
        (Some(10), Some(0))
    );
    let orders: i64 = sqlx::query_scalar("select count(*) from orders")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(orders, 0);
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
    let docs = app.http.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
}
