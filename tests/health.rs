//! `/readyz` says what is wrong in its own words, never the database driver's, and checks the
//! database on a connection of its own.

mod common;

use common::proxy::Proxy;
use serde_json::json;

/// The database gone (every connection cut, new ones refused): not ready, in the service's
/// words; ready again once it is back.
#[tokio::test]
async fn readyz_says_database_unreachable_without_the_drivers_text() {
    let proxy = Proxy::start(&common::server_address()).await;
    let name = format!("settle_test_{}", uuid::Uuid::new_v4().simple());
    let app = common::spawn_app_with(&[("database.url", json!(proxy.url(&name)))]).await;
    assert_eq!(app.get("/readyz").await.0, 200);
    proxy.blackout();
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        json!({"status": "unavailable", "reason": "database unreachable"})
    );
    proxy.restore();
    assert_eq!(app.get("/readyz").await.0, 200);
}

/// The server's port refusing connections: unreachable, not "not answering in time" (the
/// pool retries a refused connection until its acquire timeout, and says only that it timed
/// out).
#[tokio::test]
async fn readyz_says_unreachable_when_the_port_refuses_connections() {
    let proxy = Proxy::start(&common::server_address()).await;
    let name = format!("settle_test_{}", uuid::Uuid::new_v4().simple());
    let overrides = [
        ("database.url", json!(proxy.url(&name))),
        ("database.acquire_timeout_ms", json!(500)),
    ];
    let app = common::spawn_app_with(&overrides).await;
    assert_eq!(app.get("/readyz").await.0, 200);
    drop(proxy);
    let (status, body) = app.get("/readyz").await;
    assert_eq!(
        (status, body),
        (
            503,
            json!({"status": "unavailable", "reason": "database unreachable"})
        )
    );
}

/// Every connection of the api's pool taken (by long requests, say) while the database
/// answers: the instance is busy, not broken, and stays ready (it said 503 "database busy",
/// and a load balancer took every API out at the peak of traffic).
#[tokio::test]
async fn readyz_stays_ready_while_requests_hold_every_pooled_connection() {
    let overrides = [
        ("database.max_connections", json!(2)),
        ("database.acquire_timeout_ms", json!(300)),
    ];
    let app = common::spawn_app_with(&overrides).await;
    // The api's pool is this one.
    let held = [
        app.pool.acquire().await.unwrap(),
        app.pool.acquire().await.unwrap(),
    ];
    let (status, body) = app.get("/readyz").await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    // The requests that need the pool do wait for it meanwhile.
    let (status, _) = app.get("/api/v1/products").await;
    assert_eq!(status, 503);
    drop(held);
    assert_eq!(app.get("/api/v1/products").await.0, 200);
}
