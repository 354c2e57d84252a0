//! `Idempotency-Key` on orders: one effect per key, replays, reuse with another body refused.
//! Keyed orders are placed by the coalescer, whose batch transaction stores each key's answer:
//! one order per key, the first answer replayed exactly (after a restart too), refusals stored
//! as well, nothing of a key left by a batch that failed. The sell-out runs with
//! `orders.coalesce = false` (one transaction per request) as well.

mod common;

use common::{
    TestApp, api_process, assert_error, assert_refused, spawn_app, spawn_app_with, status_and_json,
};
use serde_json::{Value, json};
use settle::tokens::Role;
use sqlx::PgPool;

async fn post_with_key(app: &TestApp, key: &str, body: &Value) -> (u16, Value) {
    post_keyed(&app.http, &app.base, key, body).await
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

/// An app with a product of 5 units, its id, and buyer `a`'s order of one of them.
async fn one_of_five() -> (TestApp, i64, Value) {
    let app = spawn_app().await;
    let product = app.product(5, 100).await;
    (app, product, order(product, 1))
}

#[tokio::test]
async fn same_key_with_a_different_body_is_refused_and_changes_nothing() {
    let (app, product, body) = one_of_five().await;
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

/// [`one_of_five`] with one order placed under `key`, whose stored answer then expired.
async fn placed_under_an_expired_key(key: &str) -> (TestApp, i64, Value) {
    let (app, product, body) = one_of_five().await;
    assert_eq!(post_with_key(&app, key, &body).await.0, 201);
    sqlx::query("update idempotency_keys set expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    (app, product, body)
}

#[tokio::test]
async fn expired_keys_are_free_again() {
    let (app, _, body) = placed_under_an_expired_key("old").await;
    let (status, second) = post_with_key(&app, "old", &body).await;
    assert_eq!(status, 201);
    assert_eq!(second["id"], 2, "a new order after expiry");
}

/// A batch that Postgres aborts to break a deadlock placed nothing, and says so: 503
/// `ORDER_NOT_PLACED` (retry), not 500. The deadlock is staged: another session holds the row of
/// the expired key the order reuses while the batch, holding its product's row, writes the key,
/// then asks for the product's row; the batch waited first, so its deadlock check fires first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_aborted_by_a_deadlock_is_not_placed() {
    let (app, product, body) = placed_under_an_expired_key("dead").await;
    let mut other = app.pool.begin().await.unwrap();
    for sql in [
        "set local deadlock_timeout = '30s'",
        "select 1 from idempotency_keys where key = 'dead' for update",
    ] {
        sqlx::query(sql).execute(&mut *other).await.unwrap();
    }
    let order = tokio::spawn({
        let (http, base, body) = (app.http.clone(), app.base.clone(), body.clone());
        async move { post_keyed(&http, &base, "dead", &body).await }
    });
    common::wait_for_lock_waiter(&app.pool, "insert into idempotency_keys").await;
    let locked = sqlx::query("select 1 from products where id = $1 for update")
        .bind(product)
        .execute(&mut *other)
        .await;
    assert!(locked.is_ok(), "the batch was the victim: {locked:?}");
    other.rollback().await.unwrap();
    assert_refused(order.await.unwrap(), 503, "ORDER_NOT_PLACED");
    assert_eq!(app.stock(product).await, 4, "only the first order");
}

#[tokio::test]
async fn malformed_keys_are_refused_before_anything_happens() {
    let (app, product, body) = one_of_five().await;
    for key in ["x".repeat(256), " ".to_owned()] {
        assert_refused(
            post_with_key(&app, &key, &body).await,
            422,
            "INVALID_IDEMPOTENCY_KEY",
        );
    }
    // Sent twice, the header is refused saying so (it was read as the two joined, and refused
    // as a key of characters it did not have).
    let twice = app
        .http
        .post(app.url("/api/v1/orders"))
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .json(&body);
    let (status, said) = status_and_json(twice.send().await.expect("sent")).await;
    assert_refused((status, said.clone()), 422, "INVALID_IDEMPOTENCY_KEY");
    assert!(said.to_string().contains("not several"), "{said}");
    assert_eq!(app.stock(product).await, 5);
}

async fn post_keyed(http: &reqwest::Client, base: &str, key: &str, body: &Value) -> (u16, Value) {
    let response = http
        .post(format!("{base}/api/v1/orders"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("sent");
    status_and_json(response).await
}

/// Sends every (key, body) at once; the answers in the same order.
async fn concurrently(app: &TestApp, requests: &[(String, Value)]) -> Vec<(u16, Value)> {
    let sends = requests.iter().cloned().map(|(key, body)| {
        let (http, base) = (app.http.clone(), app.base.clone());
        tokio::spawn(async move { post_keyed(&http, &base, &key, &body).await })
    });
    futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.expect("request task"))
        .collect()
}

async fn scalar(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

fn order_by(product: i64, buyer: &str, quantity: i64) -> Value {
    json!({"product_id": product, "quantity": quantity, "buyer_id": buyer})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_answer_is_replayed_exactly_after_a_restart() {
    let config = common::test_config(&[]);
    let (pool, _db) = common::migrated_pool(&config).await;
    let http =
        common::auth::client_with(&common::auth::create_token(&pool, Role::Admin, None).await);
    let url = &config.database.url;
    let api = api_process::start(url, &["api"], &[]).await;
    let response = http
        .post(format!("{}/api/v1/products", api.base))
        .json(&json!({"name": "restart", "stock": 3, "price_cents": 100}))
        .send()
        .await
        .expect("sent");
    let (status, product) = status_and_json(response).await;
    assert_eq!(status, 201, "{product}");
    let product = product["id"].as_i64().expect("product id");
    let (wanted, too_many) = (
        order_by(product, "restart", 2),
        order_by(product, "restart", 5),
    );
    let placed = post_keyed(&http, &api.base, "restart-placed", &wanted).await;
    let refused = post_keyed(&http, &api.base, "restart-refused", &too_many).await;
    assert_eq!(placed.0, 201, "{}", placed.1);
    assert_eq!(refused.0, 409);
    assert_error(&refused.1, "OUT_OF_STOCK");

    drop(api); // SIGKILL
    let api = api_process::start(url, &["api"], &[]).await;
    assert_eq!(
        post_keyed(&http, &api.base, "restart-placed", &wanted).await,
        placed
    );
    assert_eq!(
        post_keyed(&http, &api.base, "restart-refused", &too_many).await,
        refused
    );
    let (status, reused) = post_keyed(&http, &api.base, "restart-placed", &too_many).await;
    assert_eq!(status, 422);
    assert_error(&reused, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(scalar(&pool, "select count(*) from orders").await, 1);
    assert_eq!(scalar(&pool, "select stock from products").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_buyer_keyed_sells_exactly_the_stock_coalesced() {
    every_buyer_keyed_sells_exactly_the_stock(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_buyer_keyed_sells_exactly_the_stock_one_transaction_each() {
    every_buyer_keyed_sells_exactly_the_stock(false).await;
}

/// 300 keyed buyers of one unit each on 100 units: 100 orders, 200 `OUT_OF_STOCK`, every
/// answer stored; after a restock each key still replays its first answer. (Buyers may wait
/// long for a connection one transaction each: this is about answers, not load shedding.)
async fn every_buyer_keyed_sells_exactly_the_stock(coalesce: bool) {
    let app = spawn_app_with(&[
        ("orders.coalesce", json!(coalesce)),
        ("database.acquire_timeout_ms", json!(60_000)),
    ])
    .await;
    let product = app.product(100, 250).await;
    let requests: Vec<(String, Value)> = (0..300)
        .map(|i| {
            (
                format!("sale-{i}"),
                order_by(product, &format!("buyer-{i}"), 1),
            )
        })
        .collect();
    let answers = concurrently(&app, &requests).await;
    for (status, body) in &answers {
        match status {
            201 => assert_eq!(body["quantity"], 1, "{body}"),
            409 => assert_error(body, "OUT_OF_STOCK"),
            other => panic!("answered {other}: {body}"),
        }
    }
    let placed = answers.iter().filter(|(status, _)| *status == 201).count();
    assert_eq!(placed, 100, "exactly the stock is sold");
    let sold = "select coalesce(sum(quantity), 0)::bigint from orders";
    assert_eq!(scalar(&app.pool, sold).await, 100);
    assert_eq!(scalar(&app.pool, "select stock from products").await, 0);
    let stored = "select count(*) from idempotency_keys where scope like 'orders/token:%'";
    assert_eq!(scalar(&app.pool, stored).await, 300, "every answer stored");

    let (status, _) = app
        .post(
            &format!("/api/v1/products/{product}/restock"),
            &json!({"quantity": 50}),
        )
        .await;
    assert_eq!(status, 200);
    for ((key, body), first) in requests.iter().zip(&answers) {
        assert_eq!(&post_keyed(&app.http, &app.base, key, body).await, first);
    }
    assert_eq!(scalar(&app.pool, sold).await, 100, "replays place nothing");
}

/// Twelve keys, each sent six times at once, one of the six with another quantity: one order
/// per key, every 201 of a key is that order, every other answer a refusal of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_sharing_keys_place_one_order_per_key() {
    let app = spawn_app().await;
    let product = app.product(1000, 100).await;
    let requests: Vec<(String, Value)> = (0..72)
        .map(|i| {
            let key = i % 12;
            let quantity = if i / 12 == 5 { 2 } else { 1 };
            (
                format!("dup-{key}"),
                order_by(product, &format!("dup-{key}"), quantity),
            )
        })
        .collect();
    let answers = concurrently(&app, &requests).await;
    for key in 0..12 {
        let buyer = format!("dup-{key}");
        let stored: Vec<(i64, i32)> =
            sqlx::query_as("select id, quantity from orders where buyer_id = $1")
                .bind(&buyer)
                .fetch_all(&app.pool)
                .await
                .unwrap();
        assert_eq!(stored.len(), 1, "one order for {buyer}: {stored:?}");
        let (id, quantity) = stored[0];
        for ((_, body), (status, answer)) in requests.iter().zip(&answers) {
            if body["buyer_id"] != buyer.as_str() {
                continue;
            }
            match status {
                201 => assert_eq!(
                    (&answer["id"], &answer["quantity"]),
                    (&json!(id), &json!(quantity))
                ),
                409 => assert_error(answer, "IDEMPOTENCY_KEY_IN_USE"),
                422 => assert_error(answer, "IDEMPOTENCY_KEY_REUSED"),
                other => panic!("{buyer} answered {other}: {answer}"),
            }
        }
        let (status, replay) = post_keyed(
            &app.http,
            &app.base,
            &buyer,
            &order_by(product, &buyer, quantity.into()),
        )
        .await;
        assert_eq!((status, &replay["id"]), (201, &json!(id)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_stores_no_key_and_a_retry_places_the_order() {
    let app = spawn_app().await;
    let product = app.product(10, 100).await;
    // A check the batch's key insert breaks, so the whole transaction fails after its grant.
    sqlx::query("alter table idempotency_keys add constraint no_poison check (key <> 'poison')")
        .execute(&app.pool)
        .await
        .unwrap();
    let body = order_by(product, "poisoned", 2);
    let (status, error) = post_keyed(&app.http, &app.base, "poison", &body).await;
    assert_eq!(status, 500, "{error}");
    assert_eq!(scalar(&app.pool, "select count(*) from orders").await, 0);
    assert_eq!(scalar(&app.pool, "select stock from products").await, 10);
    assert_eq!(
        scalar(&app.pool, "select count(*) from idempotency_keys").await,
        0
    );

    sqlx::query("alter table idempotency_keys drop constraint no_poison")
        .execute(&app.pool)
        .await
        .unwrap();
    // At once: the failed batch released the key when it rolled back.
    let (status, placed) = post_keyed(&app.http, &app.base, "poison", &body).await;
    assert_eq!(status, 201, "{placed}");
    assert_eq!(
        post_keyed(&app.http, &app.base, "poison", &body).await,
        (201, placed)
    );
    assert_eq!(scalar(&app.pool, "select count(*) from orders").await, 1);
    assert_eq!(scalar(&app.pool, "select stock from products").await, 8);
}

/// A key belongs to the endpoint and the token that sent it: two shop tokens using the same
/// key each place their own order (the same body from a third token too, not a replay), each
/// token's retry replays its own, and the same key on another endpoint is another key.
#[tokio::test]
async fn a_key_is_scoped_to_the_endpoint_and_the_token() {
    let app = spawn_app().await;
    let product = app.product(10, 100).await;
    let (web, pos) = (
        app.client_as(Role::Shop, None).await,
        app.client_as(Role::Shop, None).await,
    );
    let (alice, bob) = (
        order_by(product, "web-alice", 1),
        order_by(product, "pos-bob", 2),
    );
    let (status, alices) = post_keyed(&web, &app.base, "checkout-1001", &alice).await;
    assert_eq!(
        (status, &alices["buyer_id"]),
        (201, &json!("web-alice")),
        "{alices}"
    );
    let (status, bobs) = post_keyed(&pos, &app.base, "checkout-1001", &bob).await;
    assert_eq!(
        (status, &bobs["buyer_id"]),
        (201, &json!("pos-bob")),
        "{bobs}"
    );
    let (status, admins) = post_keyed(&app.http, &app.base, "checkout-1001", &alice).await;
    assert_eq!(status, 201, "{admins}");
    assert_ne!(
        admins["id"], alices["id"],
        "another token's order is not replayed"
    );
    let replay = post_keyed(&web, &app.base, "checkout-1001", &alice).await;
    assert_eq!(replay, (201, alices));
    let replay = post_keyed(&pos, &app.base, "checkout-1001", &bob).await;
    assert_eq!(replay, (201, bobs));
    let transaction = json!({"merchant_id": "m-1", "external_id": "scoped-1",
        "amount_cents": 1000, "fee_cents": 30, "status": "PAID",
        "paid_at": "2025-01-15T12:00:00Z"});
    let response = app
        .http
        .post(app.url("/api/v1/transactions"))
        .header("Idempotency-Key", "checkout-1001")
        .json(&transaction)
        .send()
        .await
        .expect("sent");
    let (status, report) = status_and_json(response).await;
    assert_eq!((status, &report["inserted"]), (201, &json!(1)));
    assert_eq!(scalar(&app.pool, "select count(*) from orders").await, 3);
}

/// A product's key compares the name as sent, as Stripe compares the parameters sent: a name
/// that differs only by the whitespace the product is stored without is another body (422),
/// not a replay. Before, the trimmed names were compared and the first answer replayed.
#[tokio::test]
async fn a_products_key_compares_the_name_as_sent() {
    let app = spawn_app().await;
    let send = |name: &str| {
        let body = json!({"name": name, "stock": 1, "price_cents": 100});
        let request = app.http.post(app.url("/api/v1/products"));
        async move {
            let response = request.header("idempotency-key", "widget-1").json(&body);
            status_and_json(response.send().await.expect("sent")).await
        }
    };
    let first = send("Widget").await;
    assert_eq!(first.0, 201, "{}", first.1);
    assert_eq!(send("Widget").await, first);
    let (status, padded) = send("  Widget\n").await;
    assert_eq!(status, 422, "{padded}");
    assert_error(&padded, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(scalar(&app.pool, "select count(*) from products").await, 1);
}
