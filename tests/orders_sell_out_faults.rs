//! Orders are never misreported when database connections break during a sell-out: connections
//! cut at random while many buyers order (keyed and not) and the stock is restocked meanwhile;
//! every answer agrees with the orders that exist, keyed retries resolve unknown outcomes, and
//! the books balance. The API reaches Postgres through a proxy that cuts connections, cuts
//! commits before they arrive and swallows commit replies (see `orders_outcome.rs`).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::outcome::{app_behind_proxy, order, orders_of, post_order};
use common::proxy::{CommitFault, Proxy};
use common::{TestApp, assert_error, status_and_json};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

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
    // 600 buyers ask for about 1,200 units of 100 + 200 restocked: it sells out even when the
    // faults, on a loaded machine, leave most orders unplaced (with 300 it did not, at times).
    let initial = 100;
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

/// Every keyed order that was not answered with its outcome (a 503, its key still in use)
/// resolves on a retry; an unkeyed
/// one named as unknown exists exactly when it was stored.
async fn check_retries(
    app: &TestApp,
    direct: &PgPool,
    answers: &[Answer],
    rows: &HashMap<String, i64>,
) {
    let unresolved =
        |a: &&Answer| a.status == 503 || a.answer["error"]["code"] == "IDEMPOTENCY_KEY_IN_USE";
    for a in answers.iter().filter(unresolved) {
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
            // A keyed order whose batch's statement failed with its key taken: the key is read
            // again while the server has not yet ended that batch's backend, which holds it (see
            // `coalesce::uncommitted`). Unknown as yet; its retry resolves it.
            (409, "IDEMPOTENCY_KEY_IN_USE") if a.key.is_some() => assert_error(&a.answer, code),
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
