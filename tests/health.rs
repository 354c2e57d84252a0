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
