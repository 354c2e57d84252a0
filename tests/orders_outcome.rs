//! Orders are never misreported when database connections break: an order that exists was
//! answered 201 (or, only when the service could not find out, 503 `ORDER_OUTCOME_UNKNOWN`),
//! an order answered anything else does not exist, and a retry with the same Idempotency-Key
//! resolves an unknown outcome. The API reaches Postgres through a proxy that cuts
//! connections, cuts commits before they arrive and swallows commit replies; backends are also
//! terminated with `pg_terminate_backend`.

mod common;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::assert_refused;
use common::proxy::{CommitFault, Proxy};
use common::{TestApp, assert_error, spawn_app_with, status_and_json};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

/// An API whose pool goes through a fresh proxy, and a direct pool on the same database for
/// the test's own reads and writes (`application_name` `settle-test`, so it is never cut).
async fn app_behind_proxy() -> (Proxy, TestApp, PgPool) {
    let server = url::Url::parse(&common::server_url()).expect("server url");
    let upstream = format!(
        "{}:{}",
        server.host_str().expect("server host"),
        server.port().unwrap_or(5432)
    );
    let proxy = Proxy::start(&upstream).await;
    let name = format!("settle_test_{}", uuid::Uuid::new_v4().simple());
    // Small batches: keyed and unkeyed orders share batches, and the faults need many commits
    // to hit.
    let app = spawn_app_with(&[
        ("database.url", json!(proxy.url(&name))),
        ("orders.max_batch", json!(8)),
    ])
    .await;
    let options = PgConnectOptions::from_str(&format!("{}/{name}", common::server_url()))
        .expect("direct url")
        .application_name("settle-test");
    let direct = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("direct pool");
    (proxy, app, direct)
}

fn order(product: i64, buyer: &str, quantity: i64) -> Value {
    json!({"product_id": product, "quantity": quantity, "buyer_id": buyer})
}

async fn post_order(app: &TestApp, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = app.http.post(app.url("/api/v1/orders")).json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    status_and_json(request.send().await.expect("sent")).await
}

/// The orders of `buyer`, as (id, quantity).
async fn orders_of(direct: &PgPool, buyer: &str) -> Vec<(i64, i32)> {
    sqlx::query_as("select id, quantity from orders where buyer_id = $1 order by id")
        .bind(buyer)
        .fetch_all(direct)
        .await
        .unwrap()
}

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

/// One buyer's request and answer in the sell-out.
struct Answer {
    buyer: String,
    key: Option<String>,
    body: Value,
    status: u16,
    answer: Value,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_cut_during_a_sell_out_never_misreport_an_order() {
    let (proxy, app, direct) = app_behind_proxy().await;
    let proxy = Arc::new(proxy);
    let initial = 300;
    let product = app.product(initial, 100).await;
    // The first commits certainly, then 8% of commits lose their reply and 4% are cut before
    // they arrive.
    for _ in 0..3 {
        proxy.plan(CommitFault::LoseReply);
        proxy.plan(CommitFault::CutBefore);
    }
    proxy.commit_faults(80, 40);
    let stop = CancellationToken::new();
    let terminated = Arc::new(AtomicU64::new(0));
    let chaos = tokio::spawn(cut_at_random(
        proxy.clone(),
        direct.clone(),
        app.config.database.url.clone(),
        terminated.clone(),
        stop.clone(),
    ));
    let restocks = tokio::spawn(restock_meanwhile(direct.clone(), product));
    let answers = sell_out(&app, product, 600).await;
    let restocked = restocks.await.expect("restocks");
    stop.cancel();
    chaos.await.expect("chaos task");
    proxy.commit_faults(0, 0);

    let (cuts, lost_replies, cut_commits) = proxy.faults();
    let terminated = terminated.load(Ordering::Relaxed);
    let faults = format!(
        "{cuts} cuts, {terminated} terminated, {lost_replies} lost replies, \
         {cut_commits} cut commits"
    );
    assert!(
        cuts > 0 && terminated > 0 && lost_replies >= 3 && cut_commits >= 3,
        "faults happened: {faults}"
    );
    check_every_kind_of_answer(&answers, &faults);
    let rows = orders_by_buyer(&direct, product).await;
    check_answers(&app, &answers, &rows).await;
    check_books(&direct, product, initial, restocked).await;
    check_retries(&app, &direct, &answers, &rows).await;
    check_books(&direct, product, initial, restocked).await;
}

/// `buyers` concurrent orders of 1 to 3 units, every third with an idempotency key.
async fn sell_out(app: &TestApp, product: i64, buyers: i64) -> Vec<Answer> {
    let sends = (0..buyers).map(|i| {
        let buyer = format!("buyer-{i}");
        let key = (i % 3 == 0).then(|| format!("key-{i}"));
        let body = order(product, &buyer, 1 + i % 3);
        let (http, url) = (app.http.clone(), app.url("/api/v1/orders"));
        tokio::spawn(async move {
            let mut request = http.post(url).json(&body);
            if let Some(key) = &key {
                request = request.header("Idempotency-Key", key);
            }
            let (status, answer) = status_and_json(request.send().await.expect("sent")).await;
            Answer {
                buyer,
                key,
                body,
                status,
                answer,
            }
        })
    });
    futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.expect("buyer task"))
        .collect()
}

/// Some orders were placed, some not, and the product sold out.
fn check_every_kind_of_answer(answers: &[Answer], faults: &str) {
    let count = |code: &str| {
        answers
            .iter()
            .filter(|a| a.answer["error"]["code"] == code)
            .count()
    };
    let created = answers.iter().filter(|a| a.status == 201).count();
    let not_placed = count("ORDER_NOT_PLACED");
    eprintln!(
        "{created} placed, {} out of stock, {not_placed} not placed, {} unknown, {} \
         unavailable; {faults}",
        count("OUT_OF_STOCK"),
        count("ORDER_OUTCOME_UNKNOWN"),
        count("SERVICE_UNAVAILABLE"),
    );
    assert!(
        created > 0 && not_placed > 0,
        "some orders placed, some not"
    );
    assert!(count("OUT_OF_STOCK") > 0, "the product sold out");
}

/// Every keyed order that was not answered with its outcome resolves on a retry; an unkeyed
/// one named as unknown exists exactly when it was stored.
async fn check_retries(
    app: &TestApp,
    direct: &PgPool,
    answers: &[Answer],
    rows: &HashMap<String, i64>,
) {
    for a in answers.iter().filter(|a| a.status == 503) {
        let existed = rows.get(&a.buyer).copied();
        match &a.key {
            Some(key) => check_keyed_retry(app, direct, a, key, existed).await,
            None => {
                if let Some(id) = a.answer["error"]["order_id"].as_i64() {
                    let (status, _) = app.get(&format!("/api/v1/orders/{id}")).await;
                    assert_eq!(status == 200, existed == Some(id), "{}", a.answer);
                }
            }
        }
    }
}

/// A keyed retry answers the stored order, or places the one that was not, exactly once.
async fn check_keyed_retry(
    app: &TestApp,
    direct: &PgPool,
    a: &Answer,
    key: &str,
    existed: Option<i64>,
) {
    let (status, retried) = retry(app, key, &a.body).await;
    let now = orders_of(direct, &a.buyer).await;
    match (existed, status) {
        (Some(id), 201) => assert_eq!(retried["id"], id, "{retried}"),
        (None, 201) => assert_eq!(
            now,
            [(
                retried["id"].as_i64().unwrap(),
                a.body["quantity"].as_i64().unwrap() as i32
            )]
        ),
        (None, 409) => {
            assert_error(&retried, "OUT_OF_STOCK");
            assert!(now.is_empty());
        }
        other => panic!("{} retried: {other:?} {retried}", a.buyer),
    }
    assert!(now.len() <= 1, "one order per key");
}

/// Until `stop`: every 10-50 ms, either cuts a random proxied connection or terminates a
/// random backend of the API's database (never the test's own `settle-test` sessions).
async fn cut_at_random(
    proxy: Arc<Proxy>,
    direct: PgPool,
    api_url: String,
    terminated: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let database = api_url
        .rsplit('/')
        .next()
        .expect("database name")
        .to_owned();
    while !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(
            10 + u64::from(rand::random::<u8>() % 41),
        ))
        .await;
        if rand::random::<u8>().is_multiple_of(4) {
            let killed: Option<bool> = sqlx::query_scalar(
                "select pg_terminate_backend(pid) from pg_stat_activity
                 where datname = $1 and application_name = 'settle' and pid <> pg_backend_pid()
                 order by random() limit 1",
            )
            .bind(&database)
            .fetch_optional(&direct)
            .await
            .expect("terminate a backend");
            if killed == Some(true) {
                terminated.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            proxy.cut_random();
        }
    }
}

/// Ten restocks of 20 units during the sale, straight to the database; the units added.
async fn restock_meanwhile(direct: PgPool, product: i64) -> i64 {
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        sqlx::query(
            "update products set stock = stock + 20, restocked = restocked + 20 where id = $1",
        )
        .bind(product)
        .execute(&direct)
        .await
        .expect("restock");
    }
    200
}

/// Each buyer's order id; panics if a buyer has two.
async fn orders_by_buyer(direct: &PgPool, product: i64) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("select buyer_id, id from orders where product_id = $1")
            .bind(product)
            .fetch_all(direct)
            .await
            .unwrap();
    let mut by_buyer = HashMap::new();
    for (buyer, id) in rows {
        assert!(
            by_buyer.insert(buyer.clone(), id).is_none(),
            "{buyer} has two orders"
        );
    }
    by_buyer
}

/// Every 201 is its stored order; every stored order was answered 201 or "unknown"; every
/// other answer is an order that does not exist; never a 500.
async fn check_answers(app: &TestApp, answers: &[Answer], rows: &HashMap<String, i64>) {
    for a in answers {
        let stored = rows.get(&a.buyer).copied();
        let code = a.answer["error"]["code"].as_str().unwrap_or("");
        match (a.status, code) {
            (201, _) => {
                assert_eq!(
                    stored,
                    a.answer["id"].as_i64(),
                    "{} got {}",
                    a.buyer,
                    a.answer
                );
                let (_, read) = app.get(&format!("/api/v1/orders/{}", a.answer["id"])).await;
                assert_eq!(read, a.answer, "the 201 is the stored order");
            }
            (503, "ORDER_OUTCOME_UNKNOWN") => {
                assert_error(&a.answer, code);
                if let (Some(id), Some(named)) = (stored, a.answer["error"]["order_id"].as_i64()) {
                    assert_eq!(id, named, "{}", a.answer);
                }
            }
            (409, "OUT_OF_STOCK") | (503, "ORDER_NOT_PLACED" | "SERVICE_UNAVAILABLE") => {
                assert_error(&a.answer, code);
                assert_eq!(
                    stored, None,
                    "{} was told {} but has an order",
                    a.buyer, a.answer
                );
            }
            (status, _) => panic!("{} answered {status}: {}", a.buyer, a.answer),
        }
    }
}

/// `initial_stock + restocked = stock + Σ quantity`, and stock ≥ 0.
async fn check_books(direct: &PgPool, product: i64, initial: i64, restocked: i64) {
    let (initial_stock, restocked_column, stock, sold, ordered): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "select p.initial_stock, p.restocked, p.stock, p.sold,
                    (select coalesce(sum(quantity), 0)::bigint from orders where product_id = p.id)
             from products p where p.id = $1",
        )
        .bind(product)
        .fetch_one(direct)
        .await
        .unwrap();
    assert_eq!((initial_stock, restocked_column), (initial, restocked));
    assert!(stock >= 0);
    assert_eq!(initial + restocked, stock + ordered, "the books balance");
    assert_eq!(sold, ordered);
}

/// Retries a keyed order until it is not refused as in flight (the lost transaction's backend
/// may take a moment to end).
async fn retry(app: &TestApp, key: &str, body: &Value) -> (u16, Value) {
    for _ in 0..100 {
        let (status, answer) = post_order(app, Some(key), body).await;
        if answer["error"]["code"] != "IDEMPOTENCY_KEY_IN_USE" {
            return (status, answer);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("key {key} stayed in use");
}
