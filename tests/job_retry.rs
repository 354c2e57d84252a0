//! `POST /api/v1/jobs/{id}/retry`: a FAILED or CANCELLED job goes back to QUEUED and starts
//! over (its input fixed anew, nothing of its earlier attempts reused, its error history kept);
//! any other state is refused with 409, an unknown id with 404. And the job JSON's operating
//! fields: `max_attempts`, `run_at`, `worker`, `errors`.

mod common;

use std::time::Duration;

use chrono_tz::Tz;
use common::ops::{settling_app, start_worker};
use common::processes::{enqueue, job_in_state, wait_processed, wait_state};
use common::settlement as support;
use common::{TestApp, assert_refused, spawn_app, spawn_app_with};
use serde_json::{Value, json};
use settle::jobs::kind::{FAIL, SLEEP};
use settle::settlement::transactions::Status;
use settle_workers::{JobState, RetryOutcome};
use support::{at, day, reference, settlements};

/// `n` PAID transactions of merchant `m-new` on 2025-01-02: input a retried job must include.
fn new_paid(n: usize) -> Vec<settle::settlement::transactions::NewTransaction> {
    (0..n)
        .map(|i| {
            support::txn(
                "m-new",
                1_000 + i as i64,
                10,
                Status::Paid,
                at("2025-01-02T08:00:00Z"),
            )
        })
        .collect()
}

async fn job(app: &TestApp, id: i64) -> Value {
    let (status, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_settlement_retried_after_new_data_settles_the_new_input_exactly() {
    let (app, _worker) = settling_app(5, 2).await;
    let old = support::store_random(&app.pool, 41, 4_000, 5, 3).await;
    let id = app.post_settlement("2025-01-01", "2025-01-03").await;
    wait_processed(&app.pool, id, 1, Duration::from_secs(30)).await;
    assert_eq!(app.cancel(id).await.0, 202);
    wait_state(&app.pool, id, "cancelled").await;

    // The operator fixes the data: payments that were missing arrive.
    let new = new_paid(7);
    support::store(&app.pool, &new).await;
    let (status, body) = app.retry(id).await;
    assert_eq!(
        (status, body),
        (202, json!({"job_id": id, "status": "QUEUED"}))
    );
    wait_state(&app.pool, id, "completed").await;

    let all: Vec<_> = old.iter().chain(&new).cloned().collect();
    let (from, to) = (day("2025-01-01"), day("2025-01-03"));
    let expected = reference(&all, from, to, Tz::UTC);
    assert_ne!(expected, reference(&old, from, to, Tz::UTC));
    assert_eq!(settlements(&app.pool, from, to).await, expected);
    let job = job(&app, id).await;
    let total = support::paid_within(&all, "2025-01-01", "2025-01-03", Tz::UTC);
    assert_eq!(
        (job["total"].as_i64(), job["processed"].as_i64()),
        (Some(total), Some(total))
    );
    assert_eq!(job["attempt"], 1, "a fresh attempt budget: {job}");
    assert_eq!(support::downloaded(&app, id).await, expected);
}

/// A settlement that ran out of attempts mid-way: its checkpoint, progress and working rows
/// (a run fixed on old input, a part half done, sums of a merchant that does not exist) stay
/// behind. A retry must reuse none of them.
async fn failed_settlement_with_stale_work(app: &TestApp) -> i64 {
    let id = common::scalar(
        &app.pool,
        "insert into finished_jobs (kind, args, state, attempt, max_attempts, finished_at, processed, total,
                           checkpoint, errors)
         values ('settlement', '{\"from\": \"2025-01-01\", \"to\": \"2025-01-02\"}', 'failed',
                 2, 2, now(), 5, 10,
                 '{\"high_water_id\": 10, \"parts\": [{\"part\": 0, \"cursor_id\": 5, \"hi_id\": 10}]}',
                 '[{\"attempt\": 1, \"error\": \"disk full\", \"at\": \"2025-01-03T00:00:00Z\"},
                   {\"attempt\": 2, \"error\": \"disk full\", \"at\": \"2025-01-03T00:01:00Z\"}]')
         returning id",
    )
    .await;
    support::leave_working_rows(&app.pool, id).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_settlement_retried_starts_over_and_keeps_its_error_history() {
    let app = spawn_app_with(&[("worker.batch_size", json!(64))]).await;
    let rows = support::store_random(&app.pool, 42, 1_500, 4, 2).await;
    let id = failed_settlement_with_stale_work(&app).await;
    let _worker = start_worker(&app);

    assert_eq!(app.retry(id).await.0, 202);
    wait_state(&app.pool, id, "completed").await;
    let (from, to) = (day("2025-01-01"), day("2025-01-02"));
    assert_eq!(
        settlements(&app.pool, from, to).await,
        reference(&rows, from, to, Tz::UTC)
    );
    let job = job(&app, id).await;
    let total = support::paid_within(&rows, "2025-01-01", "2025-01-02", Tz::UTC);
    assert_eq!(
        job["total"].as_i64(),
        Some(total),
        "input fixed anew: {job}"
    );
    let errors = job["errors"].as_array().expect("errors array");
    assert_eq!(errors.len(), 2, "history kept: {job}");
    assert_eq!(
        (&errors[0]["attempt"], &errors[0]["error"]),
        (&json!(1), &json!("disk full"))
    );
    support::assert_no_working_rows(&app.pool, id).await;
}

#[tokio::test]
async fn only_failed_or_cancelled_jobs_can_be_retried() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for state in ["queued", "running", "cancelling", "completed"] {
        let id = job_in_state(&app.pool, state).await;
        ids.push((id, state.to_uppercase()));
    }
    for (id, status) in ids {
        let (code, body) = app.retry(id).await;
        assert_refused((code, body.clone()), 409, "JOB_NOT_RETRYABLE");
        assert_eq!(body["error"]["status"], status.as_str(), "{body}");
        assert_eq!(job(&app, id).await["status"], status.as_str(), "unchanged");
    }
    assert_refused(app.retry(424_242).await, 404, "NOT_FOUND");
    let path = app.post("/api/v1/jobs/abc/retry", &json!({})).await;
    assert_refused(path, 400, "INVALID_PATH");
}

/// A retry that misses a CANCELLING job names CANCELLING, even as the job ends CANCELLED at
/// that moment: the answer is the state the requeue itself saw. (Read by a second statement,
/// it could be CANCELLED, and the 409 refused a job for a state that is retryable.) One that
/// comes after the ending retries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_racing_a_cancel_names_the_state_it_saw() {
    let app = spawn_app().await;
    let (mut retried, mut refused) = (0, 0);
    for round in 0..300 {
        let id = job_in_state(&app.pool, "cancelling").await;
        let mut conn = app.pool.acquire().await.unwrap();
        let mut ender = app.pool.acquire().await.unwrap();
        // As the holder records the cancel: the row moves to finished_jobs, CANCELLED.
        let end = tokio::spawn(async move {
            sqlx::query(
                "with ended as (delete from jobs where id = $1 returning *)
                 insert into finished_jobs (id, kind, args, state, attempt, max_attempts,
                                            started_at, finished_at, created_at)
                 select id, kind, args, 'cancelled', 1, max_attempts, now(), now(), created_at
                 from ended",
            )
            .bind(id)
            .execute(&mut *ender)
            .await
            .unwrap();
        });
        let outcome = settle_workers::retry(&mut conn, id).await.unwrap();
        end.await.unwrap();
        match outcome {
            RetryOutcome::Retried => retried += 1,
            RetryOutcome::NotRetryable(JobState::Cancelling) => refused += 1,
            other => panic!("round {round}: {other:?}"),
        }
    }
    eprintln!("{retried} retried, {refused} refused as CANCELLING");
    // Over HTTP: the 409 names the state, and a CANCELLED job is retried.
    let id = job_in_state(&app.pool, "cancelling").await;
    let (code, body) = app.retry(id).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["status"], "CANCELLING", "{body}");
    let id = job_in_state(&app.pool, "cancelled").await;
    let (code, body) = app.retry(id).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(job(&app, id).await["status"], "QUEUED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_shows_its_attempts_errors_schedule_and_holder() {
    let app = spawn_app_with(&[
        ("worker.test_kinds", json!(true)),
        ("worker.backoff_base_ms", json!(50)),
        ("worker.backoff_max_ms", json!(100)),
    ])
    .await;
    let worker = start_worker(&app);
    let failing = enqueue(&app.pool, FAIL, json!({"times": 10}), 2).await;
    let sleeping = enqueue(&app.pool, SLEEP, json!({"ms": 60_000}), 3).await;
    wait_state(&app.pool, failing, "failed").await;
    wait_state(&app.pool, sleeping, "running").await;

    let failed = job(&app, failing).await;
    assert_eq!(
        (&failed["status"], &failed["max_attempts"]),
        (&json!("FAILED"), &json!(2))
    );
    assert!(
        failed["worker"].is_null() && failed["run_at"].is_string(),
        "{failed}"
    );
    assert_eq!(attempts(&failed), [1, 2], "{failed}");
    for error in failed["errors"].as_array().unwrap() {
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{error}"
        );
        assert!(error["at"].is_string(), "{error}");
    }
    assert!(
        failed["errors"][0]["retry_at"].is_string() && failed["errors"][1]["retry_at"].is_null()
    );
    // `error` is the newest attempt's message.
    assert_eq!(failed["error"], failed["errors"][1]["error"], "{failed}");
    let running = job(&app, sleeping).await;
    assert_eq!(running["worker"], worker.owner.as_str(), "{running}");
    assert_eq!(running["errors"], json!([]));
    let (_, page) = app.get("/api/v1/jobs?status=FAILED").await;
    assert_eq!(page["data"][0]["errors"], failed["errors"]);

    // Retried, it fails twice more: the history grows, the budget was fresh.
    assert_eq!(app.retry(failing).await.0, 202);
    wait_for_errors(&app, failing, 4).await;
    let again = job(&app, failing).await;
    assert_eq!(attempts(&again), [1, 2, 1, 2], "{again}");
}

/// The attempt numbers of a job's `errors`, oldest first.
fn attempts(job: &Value) -> Vec<i64> {
    let errors = job["errors"].as_array().expect("errors array");
    errors
        .iter()
        .map(|e| e["attempt"].as_i64().unwrap())
        .collect()
}

async fn wait_for_errors(app: &TestApp, id: i64, n: usize) {
    common::processes::wait_for(Duration::from_secs(30), "errors", || async {
        let job = job(app, id).await;
        (job["status"] == "FAILED" && job["errors"].as_array().unwrap().len() == n).then_some(())
    })
    .await;
}
