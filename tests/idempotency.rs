//! `Idempotency-Key` on orders: one effect per key, replays, reuse with another body refused.

mod common;

use common::assert_refused;
use common::{assert_error, spawn_app, status_and_json};
use serde_json::json;

async fn post_with_key(
    app: &common::TestApp,
    key: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = app
        .http
        .post(app.url("/api/v1/orders"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("sent");
    status_and_json(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_requests_with_one_key_make_one_order() {
    let app = spawn_app().await;
    let product = app.product(50, 700).await;
    let body = json!({"product_id": product, "quantity": 2, "buyer_id": "retrying-client"});
    let sends = (0..20).map(|_| {
        let (app_http, url, body) = (app.http.clone(), app.url("/api/v1/orders"), body.clone());
        tokio::spawn(async move {
            let r = app_http
                .post(url)
                .header("Idempotency-Key", "key-20")
                .json(&body)
                .send()
                .await
                .unwrap();
            status_and_json(r).await
        })
    });
    let results: Vec<_> = futures::future::join_all(sends)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let created: Vec<_> = results.iter().filter(|(s, _)| *s == 201).collect();
    assert!(!created.is_empty());
    for (status, body) in &results {
        match status {
            201 => assert_eq!(body, &created[0].1, "every 201 is the same order"),
            409 => assert_error(body, "IDEMPOTENCY_KEY_IN_USE"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let orders = common::scalar(&app.pool, "select count(*) from orders").await;
    assert_eq!(orders, 1);
    // After the dust settles, a retry replays the same body and creates nothing.
    let (status, replay) = post_with_key(&app, "key-20", &body).await;
    assert_eq!((status, &replay), (201, &created[0].1));
    assert_eq!(app.stock(product).await, 48);
}

/// Buyer `a`'s order of `quantity` units.
fn order(product: i64, quantity: i64) -> serde_json::Value {
    json!({"product_id": product, "quantity": quantity, "buyer_id": "a"})
}

#[tokio::test]
async fn same_key_with_a_different_body_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let product = app.product(5, 100).await;
    let body = order(product, 1);
    assert_eq!(post_with_key(&app, "k1", &body).await.0, 201);
    let changed = order(product, 2);
    assert_refused(
        post_with_key(&app, "k1", &changed).await,
        422,
        "IDEMPOTENCY_KEY_REUSED",
    );
    // The same key is independent per endpoint scope, and other keys work normally.
    assert_eq!(post_with_key(&app, "k2", &changed).await.0, 201);
    assert_eq!(app.stock(product).await, 2);
}

#[tokio::test]
async fn an_out_of_stock_answer_is_replayed_too() {
    let app = spawn_app().await;
    let product = app.product(1, 100).await;
    let body = order(product, 3);
    let (status, first) = post_with_key(&app, "oos", &body).await;
    assert_eq!(status, 409);
    assert_error(&first, "OUT_OF_STOCK");
    let (status, again) = post_with_key(&app, "oos", &body).await;
    assert_eq!((status, again), (409, first));
}

#[tokio::test]
async fn expired_keys_are_free_again() {
    let app = spawn_app().await;
    let product = app.product(5, 100).await;
    let body = order(product, 1);
    assert_eq!(post_with_key(&app, "old", &body).await.0, 201);
    sqlx::query("update idempotency_keys set expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, second) = post_with_key(&app, "old", &body).await;
    assert_eq!(status, 201);
    assert_eq!(second["id"], 2, "a new order after expiry");
}

#[tokio::test]
async fn malformed_keys_are_refused_before_anything_happens() {
    let app = spawn_app().await;
    let product = app.product(5, 100).await;
    let body = order(product, 1);
    for key in ["x".repeat(256), " ".to_owned()] {
        assert_refused(
            post_with_key(&app, &key, &body).await,
            422,
            "INVALID_IDEMPOTENCY_KEY",
        );
    }
    assert_eq!(app.stock(product).await, 5);
}
