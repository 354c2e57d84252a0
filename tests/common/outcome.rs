//! The outcome tests' set-up: an API whose database connections run through a faulty proxy, a
//! direct pool beside it, and the requests they send.

use std::str::FromStr;

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::proxy::Proxy;
use super::{TestApp, spawn_app_with, status_and_json};

/// An API whose pool goes through a fresh proxy, and a direct pool on the same database for
/// the test's own reads and writes (`application_name` `settle-test`, so it is never cut).
pub async fn app_behind_proxy() -> (Proxy, TestApp, PgPool) {
    app_behind_proxy_with(&[]).await
}

/// [`app_behind_proxy`] with more configuration `overrides`.
pub async fn app_behind_proxy_with(overrides: &[(&str, Value)]) -> (Proxy, TestApp, PgPool) {
    let proxy = Proxy::start(&super::server_address()).await;
    let name = format!("settle_test_{}", uuid::Uuid::new_v4().simple());
    // Small batches: keyed and unkeyed orders share batches, and the faults need many commits
    // to hit.
    let mut settings = vec![
        ("database.url", json!(proxy.url(&name))),
        ("orders.max_batch", json!(8)),
    ];
    settings.extend(overrides.iter().cloned());
    let app = spawn_app_with(&settings).await;
    let options = PgConnectOptions::from_str(&format!("{}/{name}", super::server_url()))
        .expect("direct url")
        .application_name("settle-test");
    let direct = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("direct pool");
    (proxy, app, direct)
}

pub fn order(product: i64, buyer: &str, quantity: i64) -> Value {
    json!({"product_id": product, "quantity": quantity, "buyer_id": buyer})
}

pub async fn post_order(app: &TestApp, key: Option<&str>, body: &Value) -> (u16, Value) {
    post_keyed(app, "/api/v1/orders", key, body).await
}

/// POSTs `body` to `path`, with the `Idempotency-Key` `key` if given.
pub async fn post_keyed(
    app: &TestApp,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut request = app.http.post(app.url(path)).json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    status_and_json(request.send().await.expect("sent")).await
}

/// The orders of `buyer`, as (id, quantity).
pub async fn orders_of(direct: &PgPool, buyer: &str) -> Vec<(i64, i32)> {
    sqlx::query_as("select id, quantity from orders where buyer_id = $1 order by id")
        .bind(buyer)
        .fetch_all(direct)
        .await
        .unwrap()
}
