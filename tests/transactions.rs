//! `POST /api/v1/transactions` through the real HTTP server: single and array inserts, and bad
//! input answered with the right 4xx and nothing stored.

mod common;

use common::{TestApp, assert_error, spawn_app, spawn_app_with};
use serde_json::{Value, json};

fn txn(merchant: &str, amount: i64, fee: i64) -> Value {
    json!({"merchant_id": merchant, "amount_cents": amount, "fee_cents": fee,
           "status": "PAID", "paid_at": "2025-01-31T23:59:59Z"})
}

async fn stored(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from transactions")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_single_transaction_is_stored_and_returned() {
    let app = spawn_app().await;
    let mut body = txn("m-1", 1000, 30);
    body["paid_at"] = json!("2025-02-01T08:59:59+09:00");
    let (status, row) = app.post("/api/v1/transactions", &body).await;
    assert_eq!(status, 201, "{row}");
    assert!(row["id"].as_i64().is_some(), "{row}");
    assert_eq!(row["merchant_id"], "m-1");
    assert_eq!(row["amount_cents"], 1000);
    assert_eq!(row["fee_cents"], 30);
    assert_eq!(row["status"], "PAID");
    assert_eq!(row["paid_at"], "2025-01-31T23:59:59Z");
    assert_eq!(stored(&app).await, 1);
}

#[tokio::test]
async fn an_array_is_stored_whole_in_order() {
    let app = spawn_app().await;
    let batch: Vec<Value> = (0..50)
        .map(|i| txn(&format!("m-{i}"), 100 + i, i))
        .collect();
    let (status, rows) = app.post("/api/v1/transactions", &json!(batch)).await;
    assert_eq!(status, 201, "{rows}");
    let rows = rows.as_array().expect("an array of rows");
    assert_eq!(rows.len(), 50);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["merchant_id"], format!("m-{i}"));
    }
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(stored(&app).await, 50);
}

#[tokio::test]
async fn bad_fields_are_422_naming_the_field_and_store_nothing() {
    let app = spawn_app().await;
    let cases: [(&str, Value, &str); 9] = [
        ("status", json!("SETTLED"), "INVALID_STATUS"),
        ("amount_cents", json!(-1), "INVALID_AMOUNT"),
        ("fee_cents", json!(1001), "INVALID_FEE"),
        ("fee_cents", json!(-5), "INVALID_FEE"),
        ("paid_at", json!("2025-13-01T00:00:00Z"), "INVALID_PAID_AT"),
        ("paid_at", json!("2025-01-01T00:00:00"), "INVALID_PAID_AT"),
        ("merchant_id", json!(""), "INVALID_MERCHANT_ID"),
        ("merchant_id", json!("x".repeat(256)), "INVALID_MERCHANT_ID"),
        ("merchant_id", json!("a\u{0}b"), "INVALID_MERCHANT_ID"),
    ];
    for (field, value, code) in cases {
        let mut body = txn("m-1", 1000, 30);
        body[field] = value;
        let (status, error) = app.post("/api/v1/transactions", &body).await;
        assert_eq!(status, 422, "{field}: {error}");
        assert_error(&error, code);
        assert_eq!(error["error"]["field"], field, "{error}");
    }
    assert_eq!(stored(&app).await, 0);
}

#[tokio::test]
async fn wrong_shapes_are_400() {
    let app = spawn_app().await;
    let mut wrong_type = txn("m-1", 1000, 30);
    wrong_type["amount_cents"] = json!("1000");
    let mut unknown = txn("m-1", 1000, 30);
    unknown["currency"] = json!("EUR");
    let mut missing = txn("m-1", 1000, 30);
    missing.as_object_mut().unwrap().remove("paid_at");
    for body in [wrong_type, unknown, missing, json!(42), json!([1, 2])] {
        let (status, error) = app.post("/api/v1/transactions", &body).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_error(&error, "INVALID_BODY");
    }
    let response = app
        .http
        .post(app.url("/api/v1/transactions"))
        .header("content-type", "application/json")
        .body("{\"merchant_id\": ")
        .send()
        .await
        .unwrap();
    let (status, error) = common::status_and_json(response).await;
    assert_eq!(status, 400);
    assert_error(&error, "MALFORMED_JSON");
    assert_eq!(stored(&app).await, 0);
}

#[tokio::test]
async fn one_bad_element_stores_none_of_the_array() {
    let app = spawn_app().await;
    let mut batch: Vec<Value> = (0..10).map(|i| txn("m-1", 100 + i, 1)).collect();
    batch[7]["fee_cents"] = json!(10_000);
    let (status, error) = app.post("/api/v1/transactions", &json!(batch)).await;
    assert_eq!(status, 422, "{error}");
    assert_error(&error, "INVALID_FEE");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("transactions[7]"),
        "{error}"
    );
    assert_eq!(stored(&app).await, 0);
}

#[tokio::test]
async fn arrays_are_bounded_and_not_empty() {
    let app = spawn_app_with(&[("settlement.max_transactions_per_request", json!(5))]).await;
    let batch: Vec<Value> = (0..6).map(|i| txn("m-1", 100 + i, 1)).collect();
    let (status, error) = app.post("/api/v1/transactions", &json!(batch)).await;
    assert_eq!(status, 422, "{error}");
    assert_error(&error, "INVALID_BATCH_SIZE");
    let (status, error) = app.post("/api/v1/transactions", &json!([])).await;
    assert_eq!(status, 422, "{error}");
    assert_error(&error, "INVALID_BATCH_SIZE");
    assert_eq!(stored(&app).await, 0);
    let (status, rows) = app.post("/api/v1/transactions", &json!(batch[..5])).await;
    assert_eq!(status, 201, "{rows}");
    assert_eq!(stored(&app).await, 5);
}
