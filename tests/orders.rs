//! Ordering through the real HTTP API: no overselling under concurrency.

mod common;

use common::spawn_app;
use serde_json::json;

#[tokio::test]
async fn an_order_takes_stock_and_can_be_read_back() {
    let app = spawn_app().await;
    let product = app.product(5, 250).await;
    let (status, order) = app
        .post(
            "/api/v1/orders",
            &json!({"product_id": product, "quantity": 2, "buyer_id": "u-1"}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["total_cents"], 500);
    let (status, read) = app.get(&format!("/api/v1/orders/{}", order["id"])).await;
    assert_eq!(status, 200);
    assert_eq!(read, order);
    let (_, product) = app.get(&format!("/api/v1/products/{product}")).await;
    assert_eq!(
        (product["stock"].as_i64(), product["sold"].as_i64()),
        (Some(3), Some(2))
    );
}
