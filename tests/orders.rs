//! Ordering through the real HTTP API: no overselling under concurrency.

mod common;

use std::time::Duration;

use common::spawn_app;
use serde_json::json;

#[tokio::test]
async fn an_order_takes_stock_and_can_be_read_back() {
    let app = spawn_app().await;
    let product = app.product(5, 250).await;
    let (status, order) = app
        .post(
            "/api/v1/orders",
            &json!({"product_id": product, "quantity": 2, "buyer_id": "u-1"}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["total_cents"], 500);
    let (status, read) = app.get(&format!("/api/v1/orders/{}", order["id"])).await;
    assert_eq!(status, 200);
    assert_eq!(read, order);
    let (_, product) = app.get(&format!("/api/v1/products/{product}")).await;
    assert_eq!(
        (product["stock"].as_i64(), product["sold"].as_i64()),
        (Some(3), Some(2))
    );
}

/// Sends every body at once and returns (status, body) in order.
async fn concurrently(
    app: &common::TestApp,
    requests: Vec<(String, serde_json::Value)>,
) -> Vec<(u16, serde_json::Value)> {
    let sends = requests.into_iter().map(|(path, body)| {
        let http = app.http.clone();
        let url = app.url(&path);
        tokio::spawn(async move {
            let response = http.post(url).json(&body).send().await.expect("sent");
            common::status_and_json(response).await
        })
    });
    futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect()
}

/// Each ordering scenario runs twice, with `orders.coalesce` on (orders share a batch's
/// transaction) and off (one statement each): both paths keep the same promises.
macro_rules! in_both_modes {
    ($scenario:ident: $coalesced:ident, $one_statement_each:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $coalesced() {
            $scenario(true).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $one_statement_each() {
            $scenario(false).await;
        }
    };
}

in_both_modes!(five_hundred_buyers_on_one_hundred_units:
    five_hundred_buyers_never_oversell_one_hundred_units_coalesced,
    five_hundred_buyers_never_oversell_one_hundred_units_one_statement_each);

async fn five_hundred_buyers_on_one_hundred_units(coalesce: bool) {
    let app = common::spawn_app_with(&[("orders.coalesce", json!(coalesce))]).await;
    let product = app.product(100, 999).await;
    let requests = (0..500)
        .map(|i| {
            let body =
                json!({"product_id": product, "quantity": 1, "buyer_id": format!("buyer-{i}")});
            ("/api/v1/orders".to_owned(), body)
        })
        .collect();
    let results = concurrently(&app, requests).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let out_of_stock: Vec<_> = results.iter().filter(|(s, _)| *s == 409).collect();
    assert_eq!(created, 100);
    assert_eq!(out_of_stock.len(), 400);
    for (_, body) in out_of_stock {
        common::assert_error(body, "OUT_OF_STOCK");
        assert_eq!(body["error"]["available"], 0);
    }
    let (stock, rows): (i64, i64) = sqlx::query_as(
        "select p.stock, (select count(*) from orders o where o.product_id = p.id)
         from products p where p.id = $1",
    )
    .bind(product)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((stock, rows), (0, 100));
    let transactions = common::scalar_of(
        &app.pool,
        "select count(distinct xmin::text) from orders where product_id = $1",
        product,
    )
    .await;
    if coalesce {
        assert!(
            transactions < 100,
            "orders were placed {transactions} transactions for 100 orders"
        );
    } else {
        assert_eq!(transactions, 100, "one transaction per order");
    }
}

in_both_modes!(mixed_quantities_and_restocks:
    mixed_quantities_and_concurrent_restocks_keep_the_books_balanced_coalesced,
    mixed_quantities_and_concurrent_restocks_keep_the_books_balanced_one_statement_each);

async fn mixed_quantities_and_restocks(coalesce: bool) {
    let app = common::spawn_app_with(&[("orders.coalesce", json!(coalesce))]).await;
    let initial = 300;
    let product = app.product(initial, 100).await;
    let mut requests: Vec<(String, serde_json::Value)> = (0..1000)
        .map(|i| {
            let body =
                json!({"product_id": product, "quantity": 1 + i % 5, "buyer_id": format!("b{i}")});
            ("/api/v1/orders".to_owned(), body)
        })
        .collect();
    // Twenty restocks of 25 units interleaved with the buyers.
    for i in 0..20 {
        requests.insert(
            i * 50,
            (
                format!("/api/v1/products/{product}/restock"),
                json!({"quantity": 25}),
            ),
        );
    }
    let results = concurrently(&app, requests).await;
    let restocks: i64 = results
        .iter()
        .filter(|(s, b)| *s == 200 && b["restocked"].is_i64())
        .count() as i64
        * 25;
    assert_eq!(restocks, 500, "every restock answered 200");
    let placed: Vec<&serde_json::Value> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, b)| b)
        .collect();
    assert!(results.iter().all(|(s, _)| [200, 201, 409].contains(s)));
    let (stock, sold_rows, order_ids): (i64, i64, Vec<i64>) = sqlx::query_as(
        "select p.stock, coalesce(sum(o.quantity), 0)::bigint, coalesce(array_agg(o.id) filter (where o.id is not null), '{}')
         from products p left join orders o on o.product_id = p.id
         where p.id = $1 group by p.id",
    )
    .bind(product)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(stock >= 0);
    assert_eq!(
        initial + restocks,
        stock + sold_rows,
        "initial + restocks = stock + sum(quantity)"
    );
    let answered: i64 = placed.iter().map(|b| b["quantity"].as_i64().unwrap()).sum();
    assert_eq!(
        answered, sold_rows,
        "every 201 is a stored order and vice versa"
    );
    assert_eq!(placed.len(), order_ids.len());
    for body in placed {
        assert!(order_ids.contains(&body["id"].as_i64().unwrap()), "{body}");
    }
}

#[tokio::test]
async fn orders_list_newest_first_with_a_keyset_cursor() {
    let app = spawn_app().await;
    let product = app.product(10, 1).await;
    for i in 0..5 {
        let body = json!({"product_id": product, "quantity": 1, "buyer_id": format!("p{}", i % 2)});
        assert_eq!(app.post("/api/v1/orders", &body).await.0, 201);
    }
    let (status, first) = app.get("/api/v1/orders?limit=2").await;
    assert_eq!(status, 200);
    let ids = |page: &serde_json::Value| -> Vec<i64> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_i64().unwrap())
            .collect()
    };
    let mut seen = ids(&first);
    let mut cursor = first["next_cursor"].as_str().map(str::to_owned);
    while let Some(c) = cursor {
        let (_, page) = app.get(&format!("/api/v1/orders?limit=2&cursor={c}")).await;
        seen.extend(ids(&page));
        cursor = page["next_cursor"].as_str().map(str::to_owned);
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seen.len(), 5);
    assert_eq!(seen, sorted, "newest first, no duplicates");
    let (_, p0) = app
        .get(&format!("/api/v1/orders?buyer_id=p0&product_id={product}"))
        .await;
    assert_eq!(ids(&p0).len(), 3);
}

/// An order whose body never all arrives runs out of time before anything could be placed:
/// a plain 503, not "may have been placed".
#[tokio::test]
async fn an_order_whose_body_is_late_is_answered_not_placed() {
    let app = common::spawn_app_with(&[("http.request_timeout_ms", json!(300))]).await;
    let answer = app.post_late_order().await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("SERVICE_UNAVAILABLE"), "{answer}");
    assert!(answer.contains("nothing was done"), "{answer}");
    assert_eq!(
        common::scalar(&app.pool, "select count(*) from orders").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_abandoned_while_queued_is_not_placed() {
    let app = common::spawn_app_with(&[("http.request_timeout_ms", json!(300))]).await;
    let product = app.product(10, 100).await;
    // Hold the product's row so the first coalesced batch waits and the next order queues.
    let holder = common::product_row_locked(&app.pool, product).await;
    let order = |buyer: &str| json!({"product_id": product, "quantity": 1, "buyer_id": buyer});
    let first = {
        let (http, url, body) = (
            app.http.clone(),
            app.url("/api/v1/orders"),
            order("in-flight"),
        );
        tokio::spawn(async move { http.post(url).json(&body).send().await.unwrap().status() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, body) = app.post("/api/v1/orders", &order("queued")).await;
    assert_eq!(status, 503, "the queued order timed out: {body}");
    // Cut short, a placement cannot know whether its batch will still place it.
    common::assert_error(&body, "ORDER_OUTCOME_UNKNOWN");
    assert_eq!(first.await.unwrap(), 503);
    holder.rollback().await.unwrap();
    // The in-flight batch completes once the row is free; the abandoned queued order is dropped.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let buyers: Vec<String> = sqlx::query_scalar("select buyer_id from orders order by id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(buyers, ["in-flight"]);
    assert_eq!(app.stock(product).await, 9);
}

/// One statement per order: a refusal reads what is left in a second statement. A restock
/// committing between the two (staged: a trigger pauses the order's first statement once)
/// must not give `OUT_OF_STOCK` with `available` enough for the order: it is tried again and
/// placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restock_between_a_refusal_and_its_stock_read_places_the_order() {
    let app = common::spawn_app_with(&[("orders.coalesce", json!(false))]).await;
    let product = app.product(1, 100).await;
    common::pause_once(
        &app.pool,
        "after update on products for each statement",
        1.0,
    )
    .await;
    let body = json!({"product_id": product, "quantity": 2, "buyer_id": "patient"});
    let restock = async {
        let paused = "select count(*) from pg_stat_activity
                      where datname = current_database() and wait_event = 'PgSleep'";
        common::processes::wait_for(Duration::from_secs(10), "the paused order", || async {
            (common::scalar(&app.pool, paused).await > 0).then_some(())
        })
        .await;
        let path = format!("/api/v1/products/{product}/restock");
        app.post(&path, &json!({"quantity": 10})).await
    };
    let ((status, order), (restocked, _)) =
        tokio::join!(app.post("/api/v1/orders", &body), restock);
    assert_eq!(restocked, 200);
    assert_eq!(status, 201, "{order}");
    let stock = common::scalar_of(
        &app.pool,
        "select stock from products where id = $1",
        product,
    )
    .await;
    assert_eq!(stock, 9);
}
