//! `Idempotency-Key`s another request holds right now: retries of a finished request reading
//! its answer side by side, a key sent twice in one coalesced batch, and a request placing the
//! order while a retry's batch gives up. Another request holding a key is staged by the test's
//! own transaction taking the key's lock, as a request does.

mod common;

use std::time::Duration;

use common::outcome::{order, post_order};
use common::{TestApp, assert_error, spawn_app_with, status_and_json};
use serde_json::{Value, json};

/// A transaction of the test's own holding the orders endpoint's `key` of the app's admin
/// token (`app.http`'s, the app's only token), as a request in flight (or one reading the
/// key's stored answer) holds it.
async fn key_held(app: &TestApp, key: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = app.pool.begin().await.unwrap();
    let scope = "(select 'orders/token:' || id from api_tokens where role = 'admin')";
    let lock = format!("select pg_advisory_xact_lock(hashtextextended({scope} || ':' || $1, 0))");
    sqlx::query(sqlx::AssertSqlSafe(lock))
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// An app with `orders.coalesce` as given, a product, and an order placed under `key`: its
/// body and first answer.
async fn placed(coalesce: bool, key: &str) -> (TestApp, i64, Value, Value) {
    let app = spawn_app_with(&[("orders.coalesce", json!(coalesce))]).await;
    let product = app.product(10, 100).await;
    let body = order(product, "retrying", 2);
    let (status, first) = post_order(&app, Some(key), &body).await;
    assert_eq!(status, 201, "{first}");
    (app, product, body, first)
}

/// A finished request's answer is final: a retry reads it while another retry holds the key,
/// instead of being told the key is in use; another body under the key is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_finished_request_is_answered_while_another_retry_holds_the_key() {
    for coalesce in [true, false] {
        let (app, product, body, first) = placed(coalesce, "finished").await;
        let holder = key_held(&app, "finished").await;
        let replay = post_order(&app, Some("finished"), &body).await;
        assert_eq!(replay, (201, first), "coalesce {coalesce}");
        let other = post_order(&app, Some("finished"), &order(product, "other", 1)).await;
        assert_eq!(other.0, 422, "coalesce {coalesce}: {}", other.1);
        assert_error(&other.1, "IDEMPOTENCY_KEY_REUSED");
        holder.rollback().await.unwrap();
        assert_eq!(app.stock(product).await, 8, "one order");
    }
}

/// An answer about to expire may be expiring for the request holding its key, which then
/// executes anew: a retry that cannot take the key is told it is in use, not the old answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_not_replayed_an_answer_about_to_expire_while_the_key_is_held() {
    let (app, _, body, first) = placed(true, "expiring").await;
    sqlx::query(
        "update idempotency_keys set expires_at = clock_timestamp() + interval '20 seconds'
         where key = 'expiring'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let holder = key_held(&app, "expiring").await;
    let (status, answer) = post_order(&app, Some("expiring"), &body).await;
    assert_eq!(status, 409, "{answer}");
    assert_error(&answer, "IDEMPOTENCY_KEY_IN_USE");
    holder.rollback().await.unwrap();
    assert_eq!(
        post_order(&app, Some("expiring"), &body).await,
        (201, first)
    );
}

/// Two retries of a finished request that land in the same coalesced batch both get its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_of_a_finished_request_in_one_batch_are_each_answered() {
    let (app, product, body, first) = placed(true, "twice").await;
    // The product's row held: the next batch waits, and the retries queue behind it together.
    let row = common::product_row_locked(&app.pool, product).await;
    let send = |key: Option<&'static str>, body: Value| {
        let mut request = app.http.post(app.url("/api/v1/orders")).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        tokio::spawn(async move { status_and_json(request.send().await.unwrap()).await })
    };
    let waiting = send(None, order(product, "ahead", 1));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retries = [send(Some("twice"), body.clone()), send(Some("twice"), body)];
    tokio::time::sleep(Duration::from_millis(200)).await;
    row.rollback().await.unwrap();
    assert_eq!(waiting.await.unwrap().0, 201);
    for retry in retries {
        assert_eq!(retry.await.unwrap(), (201, first.clone()));
    }
    assert_eq!(
        app.stock(product).await,
        7,
        "the first order and the one ahead"
    );
}

/// A batch that gives up before it takes its keys (here, waiting for the product's row past
/// `orders.batch_timeout_ms`) while another request holds a key cannot tell whether that
/// request places the order: the key is in use, not "not placed".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_whose_batch_gives_up_while_another_request_holds_its_key_is_told_in_use() {
    let app = spawn_app_with(&[
        ("orders.batch_timeout_ms", json!(1000)),
        ("http.request_timeout_ms", json!(20_000)),
    ])
    .await;
    let product = app.product(10, 100).await;
    let row = common::product_row_locked(&app.pool, product).await;
    let placing = key_held(&app, "in-flight").await;
    let (status, body) = post_order(&app, Some("in-flight"), &order(product, "b", 1)).await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "IDEMPOTENCY_KEY_IN_USE");
    placing.rollback().await.unwrap();
    row.rollback().await.unwrap();
}
