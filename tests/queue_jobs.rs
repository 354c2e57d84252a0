//! Job outcomes through a real `settle worker`: retry with growing backoff then FAILED with
//! the error kept, panics as failures, cancellation of queued and running jobs.

mod common;

use std::time::Duration;

use common::processes::{
    WorkerProcess, enqueue, enqueue_count, job_row, job_start, probe_pool, wait_processed,
    wait_state,
};
use common::{migrated_pool, test_config};
use serde_json::{Value, json};
use settle::jobs::kind::{FAIL, NOOP, PANIC};
use settle_workers::{CancelOutcome, JobState};
use sqlx::PgPool;

fn fast_retries() -> settle::config::Config {
    test_config(&[
        ("worker.backoff_base_ms", json!(200)),
        ("worker.backoff_max_ms", json!(10_000)),
        ("worker.poll_interval_ms", json!(100)),
    ])
}

async fn row(pool: &PgPool, id: i64) -> (i32, Value, Option<Value>) {
    job_row(pool, id, "attempt, errors, result").await
}

fn millis(v: &Value) -> i64 {
    let at: chrono::DateTime<chrono::Utc> = serde_json::from_value(v.clone()).unwrap();
    at.timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_with_growing_backoff_then_fail_with_the_error_kept() {
    let config = fast_retries();
    let (pool, _db) = migrated_pool(&config).await;
    let doomed = enqueue(&pool, FAIL, json!({"times": 99}), 3).await;
    let recovers = enqueue(&pool, FAIL, json!({"times": 2}), 3).await;
    let _worker = WorkerProcess::start(&config);
    wait_state(&pool, doomed, "failed").await;
    wait_state(&pool, recovers, "completed").await;

    let (attempt, errors, _) = row(&pool, doomed).await;
    assert_eq!(attempt, 3);
    let errors = errors.as_array().unwrap().clone();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[2]["error"]
            .as_str()
            .unwrap()
            .contains("failing on purpose")
    );
    assert!(
        errors[2]["retry_at"].is_null(),
        "no retry after the last attempt"
    );
    let delays: Vec<i64> = errors[..2]
        .iter()
        .map(|e| millis(&e["retry_at"]) - millis(&e["at"]))
        .collect();
    assert!((200..=251).contains(&delays[0]), "{delays:?}");
    assert!((400..=501).contains(&delays[1]), "{delays:?}");

    let (attempt, errors, result) = row(&pool, recovers).await;
    assert_eq!((attempt, errors.as_array().unwrap().len()), (3, 2));
    assert_eq!(result, Some(json!({"attempt": 3})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_the_attempt_not_the_worker() {
    let config = fast_retries();
    let (pool, _db) = migrated_pool(&config).await;
    let id = enqueue(&pool, PANIC, json!({"times": 1}), 3).await;
    let mut worker = WorkerProcess::start(&config);
    wait_state(&pool, id, "completed").await;
    let (attempt, errors, _) = row(&pool, id).await;
    assert_eq!(attempt, 2);
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("panicking on purpose"),
        "{errors}"
    );
    let after = enqueue(&pool, NOOP, json!({}), 3).await;
    wait_state(&pool, after, "completed").await;
    assert!(worker.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_queued_job_never_starts() {
    let config = fast_retries();
    let (pool, _db) = migrated_pool(&config).await;
    let id = enqueue(&pool, NOOP, json!({}), 3).await;
    let mut conn = pool.acquire().await.unwrap();
    let outcome = settle_workers::request_cancel(&mut conn, id).await.unwrap();
    assert_eq!(outcome, CancelOutcome::Accepted(JobState::Cancelled));
    let again = settle_workers::request_cancel(&mut conn, id).await.unwrap();
    assert_eq!(again, CancelOutcome::Accepted(JobState::Cancelled));
    let _worker = WorkerProcess::start(&config);
    let later = enqueue(&pool, NOOP, json!({}), 3).await;
    wait_state(&pool, later, "completed").await;
    let (state, attempt, started) = job_start(&pool, id).await;
    assert_eq!((state.as_str(), attempt, started), ("cancelled", 0, None));
    let finished = settle_workers::request_cancel(&mut conn, later)
        .await
        .unwrap();
    assert_eq!(finished, CancelOutcome::Finished(JobState::Completed));
    assert_eq!(
        settle_workers::request_cancel(&mut conn, 999_999)
            .await
            .unwrap(),
        CancelOutcome::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_running_job_stops_at_its_next_checkpoint() {
    let config = fast_retries();
    let (pool, _db) = probe_pool(&config).await;
    let id = enqueue_count(&pool, 100_000, 10, 100).await;
    let _worker = WorkerProcess::start(&config);
    wait_processed(&pool, id, 20, Duration::from_secs(60)).await;
    let mut conn = pool.acquire().await.unwrap();
    let outcome = settle_workers::request_cancel(&mut conn, id).await.unwrap();
    assert_eq!(outcome, CancelOutcome::Accepted(JobState::Cancelling));
    wait_state(&pool, id, "cancelled").await;
    let (processed, counted): (i64, i64) = sqlx::query_as(
        "select j.processed, c.counted from all_jobs j join queue_probe_counts c on c.job_id = j.id
         where j.id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(processed < 100_000);
    // The checkpoint and the effect moved together, to the last committed batch.
    assert_eq!(processed, counted);
}
