//! A worker claims only the kinds it can run: a job of a kind it does not know stays QUEUED for
//! a worker that does (e.g. one from a newer deploy), instead of being failed.

mod common;

use std::time::Duration;

use common::processes::{enqueue, wait_state};
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::Worker;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_leaves_unknown_kinds_queued() {
    let config = common::test_config(&[
        ("worker.poll_interval_ms", json!(50)),
        ("worker.test_kinds", json!(true)),
    ]);
    let (pool, _db) = common::migrated_pool(&config).await;
    let unknown = enqueue(&pool, "from-a-newer-release", json!({}), 3).await;
    let known = enqueue(&pool, NOOP, json!({}), 3).await;

    let stop = CancellationToken::new();
    let worker = Worker::new(
        pool.clone(),
        settle::worker::settings(&config.worker),
        settle::worker::registry(&config),
    );
    let running = tokio::spawn(worker.run(stop.clone()));
    wait_state(&pool, known, "completed").await;
    // Several claim rounds later, the unknown kind is still untouched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (state, attempt): (String, i32) =
        sqlx::query_as("select state::text, attempt from all_jobs where id = $1")
            .bind(unknown)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempt), ("queued", 0));
    stop.cancel();
    running.await.unwrap();
}
