//! `GET /metrics`: the Prometheus text parsed, and its counts checked after known traffic.
//!
//! The `metrics` recorder is process-global, and the tests of this binary run in parallel and
//! share it: each test asserts only on series that it alone produces (its own routes, order
//! outcomes or job kind), so the counts are exact. The queue gauges are read from each app's
//! own database at scrape time, so they are exact per test whatever runs beside it.
//! A `settle worker` process has a recorder of its own, scraped on `worker.metrics_addr`.

mod common;

use std::time::Duration;

use common::processes::{WorkerProcess, probe_tables, wait_for, wait_state};
use common::prometheus::Scrape;
use common::prometheus::scrape;
use common::{migrated_pool, spawn_app, spawn_app_with, test_config};
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::{NewJob, Worker};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn orders_and_requests_are_counted_by_outcome_and_route_template() {
    let app = spawn_app().await;
    let product = app.product(3, 500).await;
    let order =
        |quantity: i64| json!({"product_id": product, "quantity": quantity, "buyer_id": "b-1"});
    for expected in [201, 201, 201, 409, 409] {
        assert_eq!(app.post("/api/v1/orders", &order(1)).await.0, expected);
    }
    assert_eq!(app.post("/api/v1/orders", &order(0)).await.0, 422);
    // A malformed Idempotency-Key is refused in the handler, so it counts as rejected too.
    let bad_key = app
        .http
        .post(app.url("/api/v1/orders"))
        .header("idempotency-key", "x".repeat(256))
        .json(&order(1))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 422);
    // Bodies refused before they are read as an order count as rejected orders too: malformed
    // JSON, a mistyped field, no JSON content type, a body past `http.max_body_bytes`.
    let raw = |body: String, content_type: &'static str| {
        let request = app.http.post(app.url("/api/v1/orders")).body(body);
        request.header("content-type", content_type).send()
    };
    let json = "application/json";
    let mistyped = json!({"product_id": product, "quantity": "1", "buyer_id": "b-1"});
    let too_large = format!(r#"{{"buyer_id": "{}"}}"#, "b".repeat(2 << 20));
    for (body, content_type, expected) in [
        ("{".to_string(), json, 400),
        (mistyped.to_string(), json, 400),
        (order(1).to_string(), "text/plain", 415),
        (too_large, json, 413),
    ] {
        assert_eq!(raw(body, content_type).await.unwrap().status(), expected);
    }
    for id in [987_654_321, 987_654_322] {
        assert_eq!(app.get(&format!("/api/v1/orders/{id}")).await.0, 404);
    }
    let restock = format!("/api/v1/products/{product}/restock");
    for _ in 0..3 {
        assert_eq!(app.post(&restock, &json!({"quantity": 0})).await.0, 422);
    }
    assert_eq!(app.get("/no/such/route/42").await.0, 404);

    let metrics = scrape(&app).await;
    let orders = |outcome| metrics.count("settle_orders_total", &[("outcome", outcome)]);
    assert_eq!(orders("placed"), 3.0);
    assert_eq!(orders("out_of_stock"), 2.0);
    assert_eq!(orders("rejected"), 6.0);
    // No order failed, and the series is there at 0 all the same (an alert needs it).
    let error = [("outcome", "error")];
    assert_eq!(metrics.value("settle_orders_total", &error), Some(0.0));
    // An order whose body did not all arrive in time is answered 503 by the time limit, not
    // by the handler: an error all the same (the recorder is the process's, so a second app
    // with a short time limit counts into the same series).
    let impatient = spawn_app_with(&[("http.request_timeout_ms", json!(300))]).await;
    assert!(
        impatient
            .post_late_order()
            .await
            .starts_with("HTTP/1.1 503")
    );
    let metrics = scrape(&app).await;
    let orders = |outcome| metrics.count("settle_orders_total", &[("outcome", outcome)]);
    assert_eq!(orders("error"), 1.0);
    // The coalescer decided the five well-formed orders (one at a time here).
    assert_eq!(metrics.count("settle_order_batch_size_sum", &[]), 5.0);
    assert_eq!(metrics.types["settle_order_batch_size"], "histogram");
    // Its buckets reach the largest orders.max_batch allowed.
    let largest = [("le", "10000")];
    assert_eq!(
        metrics.value("settle_order_batch_size_bucket", &largest),
        Some(5.0)
    );

    let requests = |method, route, status| {
        let labels = [("method", method), ("route", route), ("status", status)];
        metrics.count("settle_http_requests_total", &labels)
    };
    assert_eq!(requests("POST", "/api/v1/orders", "201"), 3.0);
    assert_eq!(requests("POST", "/api/v1/orders", "409"), 2.0);
    assert_eq!(requests("GET", "/api/v1/orders/{id}", "404"), 2.0);
    assert_eq!(
        requests("POST", "/api/v1/products/{id}/restock", "422"),
        3.0
    );
    assert!(requests("GET", "unmatched", "404") >= 1.0);
    let durations = |route| {
        metrics.count(
            "settle_http_request_duration_seconds_count",
            &[("route", route)],
        )
    };
    assert_eq!(durations("/api/v1/products/{id}/restock"), 3.0);
    assert_eq!(
        metrics.types["settle_http_request_duration_seconds"],
        "histogram"
    );
    // Never a raw path: the ids above and the unmatched path are nowhere in the labels.
    let routes = metrics.label_values("settle_http_requests_total", "route");
    assert!(
        routes
            .iter()
            .all(|r| !r.contains("987654321") && !r.contains("/no/such")),
        "{routes:?}"
    );
}

#[tokio::test]
async fn a_settlement_run_by_a_worker_is_counted_and_the_queue_gauges_match_the_table() {
    let app = spawn_app().await;
    let stop = CancellationToken::new();
    let registry = settle::worker::registry(&app.config);
    let settings = settle::worker::settings(&app.config.worker);
    tokio::spawn(Worker::new(app.pool.clone(), settings, registry).run(stop.clone()));
    let job = app.post_settlement("2026-01-01", "2026-01-02").await;
    wait_state(&app.pool, job, "completed").await;
    stop.cancel();
    // Jobs of a kind no worker here runs: they stay queued, waiting.
    let mut conn = app.pool.acquire().await.unwrap();
    for _ in 0..3 {
        settle_workers::enqueue(&mut conn, &NewJob::new("metrics_probe", json!({})))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let metrics = scrape(&app).await;
    let settlement = [("kind", "settlement"), ("outcome", "completed")];
    assert_eq!(
        metrics.count("settle_jobs_finished_total", &settlement),
        1.0
    );
    let runs = metrics.count(
        "settle_job_duration_seconds_count",
        &[("kind", "settlement")],
    );
    assert_eq!(runs, 1.0);
    assert_eq!(metrics.types["settle_job_duration_seconds"], "histogram");
    assert_eq!(metrics.types["settle_jobs"], "gauge");

    let table: Vec<(String, String, i64)> =
        sqlx::query_as("select kind, state::text, count(*) from all_jobs group by 1, 2")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(table.len(), 2, "{table:?}");
    for (kind, state, jobs) in &table {
        let gauge = metrics.value("settle_jobs", &[("kind", kind), ("state", state)]);
        assert_eq!(gauge, Some(*jobs as f64), "{kind} {state}");
    }
    // Every state of a kind is shown, 0 where it has no job.
    assert_eq!(
        metrics.value(
            "settle_jobs",
            &[("kind", "settlement"), ("state", "queued")]
        ),
        Some(0.0)
    );
    let waited = metrics.count(
        "settle_job_oldest_queued_seconds",
        &[("kind", "metrics_probe")],
    );
    assert!(waited >= 1.0, "{waited}");
    assert_eq!(
        metrics.value(
            "settle_job_oldest_queued_seconds",
            &[("kind", "settlement")]
        ),
        Some(0.0)
    );
}

/// Enqueues a job of `kind` and sets its row as `set` (an UPDATE's SET list) says.
async fn job_set(app: &common::TestApp, kind: &str, set: &str) {
    let mut conn = app.pool.acquire().await.unwrap();
    let id = settle_workers::enqueue(&mut conn, &NewJob::new(kind, json!({})))
        .await
        .unwrap();
    let update = format!("update jobs set {set} where id = $1");
    sqlx::query(sqlx::AssertSqlSafe(update))
        .bind(id)
        .execute(&app.pool)
        .await
        .unwrap();
}

/// A dead worker's job back in the queue (due long ago, held until a moment ago) has waited
/// since its worker last held it, not since it first came due.
#[tokio::test]
async fn a_job_back_in_the_queue_has_waited_since_it_was_last_held() {
    let app = spawn_app().await;
    // As the liveness probe leaves it: due 50 minutes ago, its last heartbeat 2 s ago.
    job_set(
        &app,
        "requeued_probe",
        "run_at = now() - interval '50 minutes',
         heartbeat_at = now() - interval '2 seconds', attempt = 1",
    )
    .await;
    let metrics = scrape(&app).await;
    let waited = metrics.count(
        "settle_job_oldest_queued_seconds",
        &[("kind", "requeued_probe")],
    );
    assert!((1.0..60.0).contains(&waited), "{waited}");
}

/// While the database stalls on the queue's tables, scrapes are answered within seconds with
/// the process's own series and without the queue gauges, however many arrive together; the
/// gauges are back once it ends. Before, each scrape waited its turn behind the one before for
/// the statement (here all past 8 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_during_a_stall_are_answered_without_the_queue_gauges() {
    let app = spawn_app().await;
    let mut conn = app.pool.acquire().await.unwrap();
    settle_workers::enqueue(&mut conn, &NewJob::new("stalled_probe", json!({})))
        .await
        .unwrap();
    drop(conn);
    let mut stall = app.pool.begin().await.unwrap();
    sqlx::query("lock table jobs in access exclusive mode")
        .execute(&mut *stall)
        .await
        .unwrap();
    let scrapes = (0..4).map(|_| {
        let request = app.http.get(app.url("/metrics"));
        async move { request.timeout(Duration::from_secs(8)).send().await }
    });
    for answer in futures::future::join_all(scrapes).await {
        let text = answer.expect("answered within 8 s").text().await.unwrap();
        assert!(text.contains("settle_orders_total"), "{text}");
        assert!(!text.contains("stalled_probe"), "{text}");
    }
    stall.rollback().await.unwrap();
    wait_for(Duration::from_secs(10), "the queue gauges back", || async {
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("stalled_probe").then_some(())
    })
    .await;
}

/// A running job whose lease expired 30 s ago (its worker died, and no worker is left to take
/// it back) is waiting for a worker, and the gauge says so; it read 0 while the job showed as
/// running, so a queue with every worker dead looked healthy.
#[tokio::test]
async fn a_running_job_whose_lease_expired_is_waiting() {
    let app = spawn_app().await;
    // As a claim leaves it, then its worker gone for 30 s past the lease.
    job_set(
        &app,
        "orphaned_probe",
        "state = 'running', attempt = 1, fence = fence + 1, lease_owner = 'gone',
         heartbeat_at = now() - interval '40 seconds',
         lease_expires_at = now() - interval '30 seconds'",
    )
    .await;
    let metrics = scrape(&app).await;
    assert_eq!(
        metrics.count(
            "settle_jobs",
            &[("kind", "orphaned_probe"), ("state", "running")]
        ),
        1.0
    );
    let waited = metrics.count(
        "settle_job_oldest_queued_seconds",
        &[("kind", "orphaned_probe")],
    );
    assert!((29.0..60.0).contains(&waited), "{waited}");
}

/// A queued job cancelled through the API ends there and then, and is counted as it ends.
#[tokio::test]
async fn a_queued_job_cancelled_is_counted_as_it_ends() {
    let app = spawn_app().await;
    let mut conn = app.pool.acquire().await.unwrap();
    let job = NewJob::new("cancel_probe", json!({}));
    let id = settle_workers::enqueue(&mut conn, &job).await.unwrap();
    let (_, body) = app.cancel(id).await;
    assert_eq!(body["status"], "CANCELLED", "{body}");
    let cancelled = [("kind", "cancel_probe"), ("outcome", "cancelled")];
    let metrics = scrape(&app).await;
    assert_eq!(metrics.count("settle_jobs_finished_total", &cancelled), 1.0);
}

#[tokio::test]
async fn a_finished_state_past_the_exact_limit_shows_the_planner_estimate() {
    let app = spawn_app().await;
    // Twice the limit, so the floor (the rows counted) alone would be far off.
    let (big, small) = (2 * settle_workers::stats::EXACT_UP_TO, 7);
    for (kind, state, n) in [
        ("metrics_bulk", "completed", big),
        ("metrics_bulk", "failed", small),
    ] {
        sqlx::query(
            "insert into finished_jobs (kind, state, started_at, finished_at)
             select $1, $2::job_state, now(), now() from generate_series(1, $3)",
        )
        .bind(kind)
        .bind(state)
        .bind(n)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    // What autovacuum does after a bulk change: the estimate reads the statistics.
    sqlx::query("vacuum analyze finished_jobs")
        .execute(&app.pool)
        .await
        .unwrap();

    let metrics = scrape(&app).await;
    let gauge = |state| {
        let labels = [("kind", "metrics_bulk"), ("state", state)];
        metrics.value("settle_jobs", &labels).expect("a gauge")
    };
    // Under the limit: exact. Past it: the estimate, close to the truth and never below the
    // rows already counted.
    assert_eq!(gauge("failed"), small as f64);
    let estimate = gauge("completed");
    let error = (estimate - big as f64).abs() / big as f64;
    assert!(
        estimate >= settle_workers::stats::EXACT_UP_TO as f64,
        "{estimate}"
    );
    assert!(error < 0.05, "estimate {estimate} for {big} rows");
}

#[tokio::test]
async fn a_worker_process_serves_its_job_counters_on_worker_metrics_addr() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    probe_tables(&pool).await;
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let env = [("SETTLE_WORKER__METRICS_ADDR", addr.to_string())];
    let mut worker = WorkerProcess::start_with(&config, &env);
    let mut conn = pool.acquire().await.unwrap();
    let job = settle_workers::enqueue(&mut conn, &NewJob::new(NOOP, json!({"record": true})))
        .await
        .unwrap();
    wait_state(&pool, job, "completed").await;

    // The counter is bumped just after the completing commit the database already shows.
    let noop = [("kind", NOOP), ("outcome", "completed")];
    let url = format!("http://{addr}/metrics");
    let text = wait_for(
        Duration::from_secs(10),
        "the worker counts the noop",
        || async {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            (Scrape::parse(&text).count("settle_jobs_finished_total", &noop) == 1.0).then_some(text)
        },
    )
    .await;
    let metrics = Scrape::parse(&text);
    // The queue gauges are the API's to serve, never repeated by every worker.
    assert_eq!(metrics.value("settle_jobs", &[]), None);
    // A counter nothing has bumped yet is there at 0 from the start (an alert on its rate, or
    // on its absence, needs the series).
    assert_eq!(metrics.value("settle_job_rescues_total", &[]), Some(0.0));
    assert!(worker.terminate().await, "{}", worker.log_text());
}
