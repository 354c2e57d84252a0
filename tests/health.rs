//! `/readyz` says what is wrong in its own words, never the database driver's.

mod common;

#[tokio::test]
async fn readyz_says_database_unreachable_without_the_drivers_text() {
    let app = common::spawn_app().await;
    assert_eq!(app.get("/readyz").await.0, 200);
    // The api's pool is this one: closed, nothing can reach the database.
    app.pool.close().await;
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"status": "unavailable", "reason": "database unreachable"})
    );
}

/// Every connection of the api's pool taken (by long requests, say) while the database answers:
/// not ready, and the reason says the pool is busy, not that the database is unreachable.
#[tokio::test]
async fn readyz_says_busy_when_the_pool_has_no_free_connection() {
    let overrides = [
        ("database.max_connections", serde_json::json!(2)),
        ("database.acquire_timeout_ms", serde_json::json!(300)),
    ];
    let app = common::spawn_app_with(&overrides).await;
    assert_eq!(app.get("/readyz").await.0, 200);
    // The api's pool is this one.
    let held = [
        app.pool.acquire().await.unwrap(),
        app.pool.acquire().await.unwrap(),
    ];
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"status": "unavailable",
                           "reason": "database busy: no free connection in the pool"})
    );
    drop(held);
    assert_eq!(app.get("/readyz").await.0, 200);
}
