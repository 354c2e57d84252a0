//! Orders are never misreported when database connections break: an order that exists was
//! answered 201 (or, only when the service could not find out, 503 `ORDER_OUTCOME_UNKNOWN`),
//! an order answered anything else does not exist, and a retry with the same Idempotency-Key
//! resolves an unknown outcome. The API reaches Postgres through a proxy that cuts
//! connections, cuts commits before they arrive and swallows commit replies; backends are also
//! terminated with `pg_terminate_backend`.

mod common;

use std::time::Duration;

use common::TestApp;
use common::assert_error;
use common::assert_refused;
use common::outcome::{app_behind_proxy, app_behind_proxy_with, order, orders_of, post_order};
use common::proxy::{CommitFault, Proxy};
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_commit_reply_is_answered_with_the_stored_order_and_a_cut_commit_as_not_placed() {
    let (proxy, app, direct) = app_behind_proxy().await;
    let product = app.product(10, 100).await;

    for key in [None, Some("lost-reply-key")] {
        let buyer = format!("lost-reply-{}", key.is_some());
        proxy.plan(CommitFault::LoseReply);
        let (status, body) = post_order(&app, key, &order(product, &buyer, 2)).await;
        assert_eq!(status, 201, "the commit took effect: {body}");
        let stored = orders_of(&direct, &buyer).await;
        assert_eq!(stored, [(body["id"].as_i64().unwrap(), 2)]);
        if let Some(key) = key {
            let (status, replay) = post_order(&app, Some(key), &order(product, &buyer, 2)).await;
            assert_eq!(
                (status, &replay),
                (201, &body),
                "the retry replays the order"
            );
        }
    }

    for key in [None, Some("cut-commit-key")] {
        let buyer = format!("cut-commit-{}", key.is_some());
        proxy.plan(CommitFault::CutBefore);
        assert_refused(
            post_order(&app, key, &order(product, &buyer, 1)).await,
            503,
            "ORDER_NOT_PLACED",
        );
        assert!(orders_of(&direct, &buyer).await.is_empty(), "not placed");
        if let Some(key) = key {
            let (status, placed) = post_order(&app, Some(key), &order(product, &buyer, 1)).await;
            assert_eq!(status, 201, "the retry places it: {placed}");
            assert_eq!(orders_of(&direct, &buyer).await.len(), 1);
        }
    }
    assert_eq!(proxy.faults(), (0, 2, 2), "every planned fault happened");
    let (stock, sold): (i64, i64) = sqlx::query_as("select stock, sold from products")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(
        (stock, sold),
        (5, 5),
        "2 + 2 units of lost replies, 1 of a retried cut commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcome_that_cannot_be_found_is_answered_unknown_and_a_keyed_retry_resolves_it() {
    let (proxy, app, direct) = app_behind_proxy().await;
    let product = app.product(10, 100).await;

    // Keyed: the commit takes effect, then the database is unreachable for the whole check.
    proxy.plan(CommitFault::LoseReplyThenBlackout);
    let body = order(product, "unknown-keyed", 1);
    let (status, unknown) = post_order(&app, Some("unknown-key"), &body).await;
    assert_eq!(status, 503, "{unknown}");
    assert_error(&unknown, "ORDER_OUTCOME_UNKNOWN");
    let order_id = unknown["error"]["order_id"].as_i64().expect("order_id");
    assert_eq!(orders_of(&direct, "unknown-keyed").await, [(order_id, 1)]);
    proxy.restore();
    let (status, resolved) = post_order(&app, Some("unknown-key"), &body).await;
    assert_eq!(status, 201, "{resolved}");
    assert_eq!(
        resolved["id"], order_id,
        "the retry answers the order that exists"
    );
    assert_eq!(orders_of(&direct, "unknown-keyed").await.len(), 1);

    // Coalesced without a key: the answer names the id the order has if it was placed.
    proxy.plan(CommitFault::LoseReplyThenBlackout);
    let (status, unknown) = post_order(&app, None, &order(product, "unknown-plain", 1)).await;
    assert_eq!(status, 503, "{unknown}");
    assert_error(&unknown, "ORDER_OUTCOME_UNKNOWN");
    let order_id = unknown["error"]["order_id"].as_i64().expect("order_id");
    proxy.restore();
    let (status, found) = app.get(&format!("/api/v1/orders/{order_id}")).await;
    assert_eq!((status, &found["buyer_id"]), (200, &json!("unknown-plain")));
}

/// An app behind a proxy whose batches have a one-second deadline, far below the request
/// timeout, so only the batch's deadline can answer in time; and a product of 10 at 100.
async fn deadline_app() -> (Proxy, TestApp, PgPool, i64) {
    let (proxy, app, direct) = app_behind_proxy_with(&[
        ("orders.batch_timeout_ms", json!(1000)),
        ("http.request_timeout_ms", json!(20_000)),
    ])
    .await;
    let product = app.product(10, 100).await;
    (proxy, app, direct, product)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_past_its_deadline_is_resolved_and_the_product_sells_on() {
    let (proxy, app, direct, product) = deadline_app().await;

    // The commit reaches the server, then the connection goes silent without closing.
    proxy.plan(CommitFault::Partition {
        commit_arrives: true,
    });
    let (status, placed) = post_order(&app, None, &order(product, "silent-after", 1)).await;
    assert_eq!(status, 201, "the commit took effect: {placed}");
    let placed_id = placed["id"].as_i64().unwrap();
    assert_eq!(orders_of(&direct, "silent-after").await, [(placed_id, 1)]);

    // The commit never arrives: the server ends the session idle in its transaction.
    proxy.plan(CommitFault::Partition {
        commit_arrives: false,
    });
    let body = order(product, "silent-before", 1);
    assert_refused(
        post_order(&app, Some("silent-before-key"), &body).await,
        503,
        "ORDER_NOT_PLACED",
    );
    assert!(orders_of(&direct, "silent-before").await.is_empty());

    let (status, retried) = post_order(&app, Some("silent-before-key"), &body).await;
    assert_eq!(status, 201, "the keyed retry places it: {retried}");
    let (stock, sold): (i64, i64) = sqlx::query_as("select stock, sold from products")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!((stock, sold), (8, 2));
}

/// An order placed with the key `placed-key` before the trouble: its body and its answer.
async fn placed_before(app: &TestApp, product: i64) -> (Value, Value) {
    let body = order(product, "placed-before", 1);
    let (status, placed) = post_order(app, Some("placed-key"), &body).await;
    assert_eq!(status, 201, "{placed}");
    (body, placed)
}

/// Once a batch waits for the product's `row`: holds the orders table against inserts, and
/// `ms` later lets the row go, so the batch goes on to wait in its insert. Returns the
/// transaction holding the table.
async fn inserts_held_then_row_freed(
    direct: &PgPool,
    row: sqlx::Transaction<'static, Postgres>,
    ms: u64,
) -> sqlx::Transaction<'static, Postgres> {
    common::wait_for_lock_waiter(direct, "from products").await;
    let mut table = direct.begin().await.unwrap();
    sqlx::query("lock table orders in share mode")
        .execute(&mut *table)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    row.rollback().await.unwrap();
    table
}

/// While another transaction holds the product's row past a batch's deadline: the batch's
/// own wait ends with it (no backend is left queued on the row, one more per batch), an
/// unkeyed order is not placed, and a keyed retry of an order placed before is replayed, not
/// told "not placed".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_waiting_on_a_locked_product_past_its_deadline_gives_up_and_answers_keys() {
    let (_proxy, app, direct, product) = deadline_app().await;
    let (body, placed) = placed_before(&app, product).await;

    let holder = common::product_row_locked(&direct, product).await;
    assert_refused(
        post_order(&app, None, &order(product, "waiting", 1)).await,
        503,
        "ORDER_NOT_PLACED",
    );
    let replayed = post_order(&app, Some("placed-key"), &body).await;
    assert_eq!(replayed, (201, placed), "the retry replays the order");
    let waiting = "select count(*) from pg_stat_activity
                   where datname = current_database() and application_name = 'settle'
                     and wait_event_type = 'Lock'";
    let what = "the batches' backends to stop waiting for the row";
    common::processes::wait_for(Duration::from_secs(10), what, || async {
        (common::scalar(&direct, waiting).await == 0).then_some(())
    })
    .await;
    holder.rollback().await.unwrap();
    assert!(orders_of(&direct, "waiting").await.is_empty());
    assert_eq!(orders_of(&direct, "placed-before").await.len(), 1);
}

/// A new keyed order whose batch waits past its deadline after taking its key: its own
/// backend, whose wait for the orders table began late and ends later than the batch's
/// deadline, still holds the key when the answer is decided; the order is "not placed", not
/// "key in use".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_batch_past_its_deadline_after_taking_its_key_is_not_placed() {
    let (_proxy, app, direct, product) = deadline_app().await;
    let row = common::product_row_locked(&direct, product).await;
    let body = order(product, "new-keyed", 1);
    let staged = async {
        // Most of the batch's second gone: its insert's own lock wait outlasts the deadline.
        inserts_held_then_row_freed(&direct, row, 600).await
    };
    let (answer, table) = tokio::join!(post_order(&app, Some("new-key"), &body), staged);
    assert_refused(answer, 503, "ORDER_NOT_PLACED");
    table.rollback().await.unwrap();
    // The batch's own backend lets go of the key once it has noticed its client is gone; a
    // retry meanwhile is told the key is in use, and retries, as the API asks.
    let what = "the key to be free";
    let (status, placed) = common::processes::wait_for(Duration::from_secs(10), what, || async {
        let answer = post_order(&app, Some("new-key"), &body).await;
        (answer.0 != 409).then_some(answer)
    })
    .await;
    assert_eq!(status, 201, "the retry places it: {placed}");
    assert_eq!(orders_of(&direct, "new-keyed").await.len(), 1);
}

/// A keyed retry of an order placed before, in a batch that takes its keys and then runs past
/// its deadline (a new order's insert waits for the orders table): the retry is replayed, though
/// the batch's own backend still holds the key when the answers are decided; the new order is
/// not placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_retry_in_a_batch_given_up_after_taking_its_keys_is_replayed() {
    let (_proxy, app, direct, product) = deadline_app().await;
    let (body, placed) = placed_before(&app, product).await;
    let row = common::product_row_locked(&direct, product).await;
    let (first_answered, first_done) = tokio::sync::oneshot::channel();
    let first = async {
        let answer = post_order(&app, None, &order(product, "first", 1)).await;
        first_answered.send(()).unwrap();
        answer
    };
    // Queued while the first batch waits for the row: the retry and the new order share the
    // next batch.
    let next_batch = async {
        common::wait_for_lock_waiter(&direct, "from products").await;
        let new = order(product, "new", 1);
        tokio::join!(
            post_order(&app, Some("placed-key"), &body),
            post_order(&app, None, &new)
        )
    };
    let staged = async {
        first_done.await.unwrap();
        // The first batch's backend has left its wait; the next batch's is waiting.
        tokio::time::sleep(Duration::from_millis(200)).await;
        inserts_held_then_row_freed(&direct, row, 300).await
    };
    let (first, (retry, new), table) = tokio::join!(first, next_batch, staged);
    assert_refused(first, 503, "ORDER_NOT_PLACED");
    assert_eq!(retry, (201, placed), "the retry replays the order");
    assert_refused(new, 503, "ORDER_NOT_PLACED");
    table.rollback().await.unwrap();
    assert!(orders_of(&direct, "new").await.is_empty());
    assert_eq!(orders_of(&direct, "placed-before").await.len(), 1);
}
