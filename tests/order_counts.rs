//! `settle_orders_total` counts orders, not answers: an order is counted once, where it is
//! decided, whether or not its client hears the answer, and a keyed retry answered with that
//! order is not counted again. A slow decision is staged by holding the product's row from a
//! transaction of the test's own, with and without coalescing.
//!
//! The `metrics` recorder is the process's: the tests of this binary take [`RECORDER`] in turn
//! and check what their own orders added to it.

mod common;

use std::time::Duration;

use common::outcome::{order, orders_of, post_order};
use common::prometheus::scrape;
use common::{TestApp, assert_refused, held_open, spawn_app_with, wait_for_lock_waiter};
use serde_json::{Value, json};
use sqlx::{Postgres, Transaction};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

static RECORDER: Mutex<()> = Mutex::const_new(());

/// What the process has counted: orders by outcome, and the coalesced batches observed.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counted {
    placed: f64,
    out_of_stock: f64,
    rejected: f64,
    error: f64,
    batches: f64,
}

impl Counted {
    async fn now(app: &TestApp) -> Self {
        let metrics = scrape(app).await;
        let orders = |outcome| metrics.count("settle_orders_total", &[("outcome", outcome)]);
        Self {
            placed: orders("placed"),
            out_of_stock: orders("out_of_stock"),
            rejected: orders("rejected"),
            error: orders("error"),
            batches: metrics.count("settle_order_batch_size_count", &[]),
        }
    }

    /// What was counted since `before`, once it is `expected` or 10 s have passed.
    async fn since(app: &TestApp, before: Self, expected: Self) -> Self {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = Self::now(app).await;
            let added = Self {
                placed: now.placed - before.placed,
                out_of_stock: now.out_of_stock - before.out_of_stock,
                rejected: now.rejected - before.rejected,
                error: now.error - before.error,
                batches: now.batches - before.batches,
            };
            if added == expected || tokio::time::Instant::now() > deadline {
                return added;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Asserts that since `before` one order was counted, `placed`, and nothing else, and one
/// batch observed if the app coalesces.
async fn assert_one_placed(app: &TestApp, before: Counted, coalesce: bool) {
    let expected = Counted {
        placed: 1.0,
        batches: if coalesce { 1.0 } else { 0.0 },
        ..Counted::default()
    };
    let counted = Counted::since(app, before, expected).await;
    assert_eq!(counted, expected, "coalesce = {coalesce}");
}

/// An app placing orders with or without coalescing (and `more` configuration), and a product
/// of 10 at 100.
async fn app_and_product(coalesce: bool, more: &[(&str, Value)]) -> (TestApp, i64) {
    let mut settings = vec![("orders.coalesce", json!(coalesce))];
    settings.extend(more.iter().cloned());
    let app = spawn_app_with(&settings).await;
    let product = app.product(10, 100).await;
    (app, product)
}

/// The product's row, held by a transaction of the test's own until it ends.
async fn row_held(app: &TestApp, product: i64) -> Transaction<'static, Postgres> {
    let lock = format!("select 1 from products where id = {product} for update");
    held_open(&app.pool, &[&lock]).await
}

/// Sends `POST /api/v1/orders` with `body` whole on a connection of its own, and returns the
/// connection, unread: dropping it hangs up.
async fn send_order(app: &TestApp, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut client = TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "POST /api/v1/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        app.admin_token,
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    client
}

/// An order whose client hangs up while its decision waits for the product's row is placed
/// once the row is free, and counted `placed`: nobody heard the answer, but the order exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_placed_after_its_client_hung_up_is_counted_placed() {
    let _recorder = RECORDER.lock().await;
    for coalesce in [true, false] {
        let (app, product) = app_and_product(coalesce, &[]).await;
        let before = Counted::now(&app).await;
        let row = row_held(&app, product).await;
        let client = send_order(&app, &order(product, "hung-up", 1)).await;
        wait_for_lock_waiter(&app.pool, "products").await;
        drop(client);
        // Time for the server to see the connection closed and drop the request's handler.
        tokio::time::sleep(Duration::from_millis(500)).await;
        row.rollback().await.unwrap();
        assert_one_placed(&app, before, coalesce).await;
        assert_eq!(orders_of(&app.pool, "hung-up").await.len(), 1);
    }
}

/// An order answered 503 `ORDER_OUTCOME_UNKNOWN` by `http.request_timeout_ms` while its
/// decision waits for the product's row is placed once the row is free: it is counted
/// `placed`, not `error`, and its keyed retries, told its key is in use or answered with it,
/// are not counted again (nor the replay's batch observed: it decided nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_placed_after_its_request_timed_out_is_counted_placed_once() {
    let _recorder = RECORDER.lock().await;
    for coalesce in [true, false] {
        let timeout = [("http.request_timeout_ms", json!(1000))];
        let (app, product) = app_and_product(coalesce, &timeout).await;
        let before = Counted::now(&app).await;
        let row = row_held(&app, product).await;
        let body = order(product, "timed-out", 1);
        assert_refused(
            post_order(&app, Some("late-key"), &body).await,
            503,
            "ORDER_OUTCOME_UNKNOWN",
        );
        if !coalesce {
            // Its placement task holds the key while it waits for the row: a retry now is
            // told so, and is not counted (the order is the first request's).
            assert_refused(
                post_order(&app, Some("late-key"), &body).await,
                409,
                "IDEMPOTENCY_KEY_IN_USE",
            );
        }
        row.rollback().await.unwrap();
        // Until the first request's decision is stored, its key is in use (409).
        let what = "the key to be free";
        let (status, retried) =
            common::processes::wait_for(Duration::from_secs(10), what, || async {
                let answer = post_order(&app, Some("late-key"), &body).await;
                (answer.0 != 409).then_some(answer)
            })
            .await;
        assert_eq!(status, 201, "coalesce = {coalesce}: {retried}");
        let stored = orders_of(&app.pool, "timed-out").await;
        assert_eq!(stored, [(retried["id"].as_i64().unwrap(), 1)]);
        assert_one_placed(&app, before, coalesce).await;
    }
}

/// Two orders answered 503 `ORDER_OUTCOME_UNKNOWN` by `http.request_timeout_ms`: the one whose
/// batch waited for the product's row is placed once the row is free, and counted `placed`; the
/// one queued behind that batch is dropped by the next one, decided by nothing, and counted an
/// `error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_timed_out_in_the_queue_is_an_error_and_its_batch_neighbour_placed() {
    let _recorder = RECORDER.lock().await;
    let timeout = [("http.request_timeout_ms", json!(1000))];
    let (app, product) = app_and_product(true, &timeout).await;
    let before = Counted::now(&app).await;
    let row = row_held(&app, product).await;
    let first = order(product, "in-batch", 1);
    let (in_batch, queued) = tokio::join!(post_order(&app, None, &first), async {
        wait_for_lock_waiter(&app.pool, "products").await;
        post_order(&app, None, &order(product, "queued", 1)).await
    });
    assert_refused(in_batch, 503, "ORDER_OUTCOME_UNKNOWN");
    assert_refused(queued, 503, "ORDER_OUTCOME_UNKNOWN");
    row.rollback().await.unwrap();

    let expected = Counted {
        placed: 1.0,
        error: 1.0,
        batches: 1.0,
        ..Counted::default()
    };
    assert_eq!(Counted::since(&app, before, expected).await, expected);
    assert_eq!(orders_of(&app.pool, "in-batch").await.len(), 1);
    assert!(orders_of(&app.pool, "queued").await.is_empty());
}
