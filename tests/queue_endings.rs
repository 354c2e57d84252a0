//! How attempts end when a cancel, a transient error or a hang meets the end of a job: a cancel
//! answered `cancelling` always ends CANCELLED (inside the completing batch, at a runtime or
//! batched completion, at a snooze), and a completion that locked the row first makes the
//! cancel answer that the job finished; transient errors and attempt timeouts spend attempts
//! and end FAILED with every error kept. Cancels use in-process workers; the transient and
//! timeout cases run real `settle worker` processes configured through the environment.

mod common;

use std::time::Duration;

use common::TestDatabase;
use common::ops::{InProcessWorker, start_worker_on};
use common::processes::{
    WorkerProcess, enqueue, job_row, job_start, probe_pool, wait_for, wait_state,
};
use common::{migrated_pool, test_config};
use serde_json::{Value, json};
use settle::config::Config;
use settle::jobs::kind::{FINAL_STEP, SLEEP, STUBBORN, TRANSIENT};
use settle_workers::{CancelOutcome, JobState};
use sqlx::{Connection, PgConnection, PgPool};

/// A [`fast`] queue database with the probe tables, and an in-process worker on it.
async fn with_worker() -> (PgPool, TestDatabase, InProcessWorker, Config) {
    let config = fast(&[]);
    let (pool, db) = probe_pool(&config).await;
    let worker = start_worker_on(&config, &pool);
    (pool, db, worker, config)
}

fn fast(overrides: &[(&str, Value)]) -> Config {
    let mut all = vec![
        ("worker.backoff_base_ms", json!(100)),
        ("worker.backoff_max_ms", json!(1000)),
        ("worker.poll_interval_ms", json!(100)),
        ("worker.test_kinds", json!(true)),
    ];
    all.extend(overrides.iter().cloned());
    test_config(&all)
}

async fn cancel(pool: &PgPool, id: i64) -> CancelOutcome {
    let mut conn = pool.acquire().await.unwrap();
    settle_workers::request_cancel(&mut conn, id).await.unwrap()
}

/// Waits until `final_step` job `id` is inside its completing batch.
async fn wait_marked(pool: &PgPool, id: i64) {
    wait_for(
        Duration::from_secs(60),
        "the job inside its last batch",
        || async {
            let marked: bool = sqlx::query_scalar(
                "select exists (select 1 from queue_probe_marks where job_id = $1)",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
            marked.then_some(())
        },
    )
    .await;
}

/// (state, attempt, result, errors, cancel_requested, lease_owner) of a job.
async fn job(pool: &PgPool, id: i64) -> (String, i32, Option<Value>, Value, bool, Option<String>) {
    let columns = "state::text, attempt, result, errors, cancel_requested, lease_owner";
    job_row(pool, id, columns).await
}

async fn effects(pool: &PgPool, id: i64) -> i64 {
    sqlx::query_scalar("select count(*) from queue_probe_effects where job_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_the_completing_commit_rolls_the_batch_back_and_ends_cancelled() {
    let (pool, _db, _worker, _) = with_worker().await;
    let id = enqueue(&pool, FINAL_STEP, json!({"wait": "cancel"}), 3).await;
    wait_marked(&pool, id).await;
    // The job has written its effect in its last batch and not committed it yet.
    assert_eq!(
        cancel(&pool, id).await,
        CancelOutcome::Accepted(JobState::Cancelling)
    );
    wait_state(&pool, id, "cancelled").await;
    let (_, attempt, result, errors, _, owner) = job(&pool, id).await;
    assert_eq!((attempt, result, owner), (1, None, None));
    assert_eq!(errors, json!([]));
    assert_eq!(
        effects(&pool, id).await,
        0,
        "the batch's write must not land"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_completing_commit_waits_and_is_told_the_job_finished() {
    let (pool, _db, _worker, config) = with_worker().await;
    let blocker = "settle-endings-cancel";
    let args = json!({"wait": "blocked", "blocker": blocker});
    let id = enqueue(&pool, FINAL_STEP, args, 3).await;
    wait_marked(&pool, id).await;
    // The completing batch holds the job's row; the cancel queues behind it.
    let mut conn = PgConnection::connect(&config.database.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "set application_name = '{blocker}'"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let outcome = settle_workers::request_cancel(&mut conn, id).await.unwrap();
    assert_eq!(outcome, CancelOutcome::Finished(JobState::Completed));
    let (state, _, result, _, requested, _) = job(&pool, id).await;
    assert_eq!(state, "completed");
    assert_eq!(result, Some(json!({"final_step": true})));
    assert!(!requested, "a refused cancel leaves no flag behind");
    assert_eq!(effects(&pool, id).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_completes_or_fails_despite_a_cancel_ends_cancelled() {
    let (pool, _db, _worker, _) = with_worker().await;
    // Left to the completion batcher; recorded by the runtime with a result; failed with
    // attempts to spare.
    let mut ids = Vec::new();
    for then in ["complete", "result", "fail"] {
        let args = json!({"wait_ms": 60_000, "then": then});
        ids.push(enqueue(&pool, STUBBORN, args, 3).await);
    }
    for &id in &ids {
        wait_state(&pool, id, "running").await;
        assert_eq!(
            cancel(&pool, id).await,
            CancelOutcome::Accepted(JobState::Cancelling)
        );
    }
    for &id in &ids {
        wait_state(&pool, id, "cancelled").await;
        let (_, attempt, result, _, _, owner) = job(&pool, id).await;
        assert_eq!((attempt, result, owner), (1, None, None), "job {id}");
    }
    let (_, _, _, errors, _, _) = job(&pool, ids[2]).await;
    assert_eq!(errors.as_array().unwrap().len(), 1, "{errors}");
    assert!(
        errors[0]["retry_at"].is_null(),
        "no retry planned: {errors}"
    );
}

/// A body that ignores a cancel and then the shutdown past its grace is released; with the
/// cancel pending, that release ends it CANCELLED at once instead of leaving it CANCELLING
/// until its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_at_shutdown_with_a_pending_cancel_ends_cancelled() {
    let config = fast(&[("worker.shutdown_grace_ms", json!(100))]);
    let (pool, _db) = probe_pool(&config).await;
    let worker = start_worker_on(&config, &pool);
    let args = json!({"ms": 60_000, "ignore_token": true});
    let id = enqueue(&pool, SLEEP, args, 3).await;
    wait_state(&pool, id, "running").await;
    assert_eq!(
        cancel(&pool, id).await,
        CancelOutcome::Accepted(JobState::Cancelling)
    );
    worker.stop().await;
    let (state, attempt, _, _, _, owner) = job(&pool, id).await;
    assert_eq!((state.as_str(), attempt, owner), ("cancelled", 1, None));
}

/// An ending that decides between requeueing and ending the job (a failure with attempts left,
/// a snooze, a shutdown's release) and meets a cancel still committing waits for it, then ends
/// the job CANCELLED: it decides on the row it locked, not on the version its statement began
/// with. The cancel is staged with `request_cancel`'s own two statements, left uncommitted.
#[tokio::test]
async fn an_ending_that_waits_for_a_cancel_in_flight_ends_cancelled() {
    let (pool, _db) = migrated_pool(&fast(&[])).await;
    for ending in ["fail", "snooze", "release"] {
        let id = enqueue(&pool, SLEEP, json!({"ms": 0}), 3).await;
        let mut conn = pool.acquire().await.unwrap();
        let kinds = [SLEEP.to_owned()];
        let lease = Duration::from_secs(60);
        let claimed = settle_workers::claim::claim(&mut conn, "w", 1, lease, &kinds, &[])
            .await
            .unwrap();
        let fence = claimed[0].fence;
        let mut cancel = pool.begin().await.unwrap();
        for sql in [
            "select state from jobs where id = $1 for update",
            "update jobs set cancel_requested = true, state = 'cancelling' where id = $1",
        ] {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut *cancel)
                .await
                .unwrap();
        }
        let ended = tokio::spawn(async move {
            let minute = Duration::from_secs(60);
            match ending {
                "fail" => settle_workers::finish::fail(&mut conn, id, fence, "boom", minute, false)
                    .await
                    .unwrap(),
                "snooze" => settle_workers::finish::snooze(&mut conn, id, fence, minute)
                    .await
                    .unwrap(),
                _ => settle_workers::finish::release(&mut conn, &[(id, fence)])
                    .await
                    .unwrap()
                    .pop(),
            }
        });
        common::wait_for_lock_waiter(&pool, "with held as").await;
        cancel.commit().await.unwrap();
        let ended = ended.await.unwrap().map(|e| e.state);
        assert_eq!(ended, Some(JobState::Cancelled), "{ending}");
        let (state, _, _, _, _, owner) = job(&pool, id).await;
        assert_eq!((state.as_str(), owner), ("cancelled", None), "{ending}");
    }
}

/// A job on its last attempt whose worker died is put back in the queue by the probe, and the
/// next claim takes it one attempt past its last (that claim's worker fails it as lost). When
/// that worker dies too and a cancel ends the job instead, it ends as its last attempt: a
/// finished job's attempt is never above `max_attempts`.
#[tokio::test]
async fn a_cancel_ending_a_job_claimed_past_its_last_attempt_keeps_it_in_range() {
    let (pool, _db) = migrated_pool(&fast(&[])).await;
    let id = enqueue(&pool, SLEEP, json!({"ms": 600_000}), 1).await;
    let mut conn = pool.acquire().await.unwrap();
    let kinds = [SLEEP.to_owned()];
    let lease = Duration::from_secs(60);
    let claim = settle_workers::claim::claim;
    claim(&mut conn, "dead+lock", 1, lease, &kinds, &[])
        .await
        .unwrap();
    // No session holds the owner's liveness lock: the probe takes the job back.
    let dead = ["dead+lock".to_owned()];
    let probe = settle_workers::liveness::probe(&mut conn, "prober", &dead)
        .await
        .unwrap();
    assert_eq!(probe.requeued, 1);
    let claimed = claim(&mut conn, "next", 1, lease, &kinds, &[])
        .await
        .unwrap();
    assert_eq!((claimed[0].attempt, claimed[0].max_attempts), (2, 1));
    // That worker is lost before it records the failure: its lease runs out.
    sqlx::query("update jobs set lease_expires_at = now() - interval '1 second' where id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        cancel(&pool, id).await,
        CancelOutcome::Accepted(JobState::Cancelled)
    );
    let (state, attempt, ..) = job(&pool, id).await;
    assert_eq!((state.as_str(), attempt), ("cancelled", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snooze_keeps_a_pending_cancel() {
    let (pool, _db, _worker, _) = with_worker().await;
    let hour = 3_600_000;
    let args = json!({"wait_ms": 60_000, "then": "snooze", "after_ms": hour});
    let cancelled = enqueue(&pool, STUBBORN, args, 3).await;
    wait_state(&pool, cancelled, "running").await;
    assert_eq!(
        cancel(&pool, cancelled).await,
        CancelOutcome::Accepted(JobState::Cancelling)
    );
    wait_state(&pool, cancelled, "cancelled").await;
    let (_, attempt, _, errors, _, owner) = job(&pool, cancelled).await;
    assert_eq!((attempt, owner), (1, None));
    assert_eq!(errors, json!([]));

    // Without a cancel the same snooze puts the job back for later, its attempt given back.
    let args = json!({"wait_ms": 0, "then": "snooze", "after_ms": hour});
    let snoozed = enqueue(&pool, STUBBORN, args, 3).await;
    wait_for(Duration::from_secs(60), "the job snoozed", || async {
        let (state, attempt, started) = job_start(&pool, snoozed).await;
        (state == "queued" && started.is_some()).then_some(attempt)
    })
    .await;
    let (attempt, later): (i32, bool) = sqlx::query_as(
        "select attempt, run_at > now() + interval '50 minutes' from all_jobs where id = $1",
    )
    .bind(snoozed)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((attempt, later), (0, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_a_bounded_number_of_times_per_attempt() {
    let config = fast(&[("worker.max_transient_retries", json!(2))]);
    let (pool, _db) = probe_pool(&config).await;
    let id = enqueue(&pool, TRANSIENT, json!({}), 3).await;
    let _worker = WorkerProcess::start(&config);
    wait_state(&pool, id, "failed").await;
    let (_, attempt, _, errors, _, owner) = job(&pool, id).await;
    assert_eq!((attempt, owner), (3, None));
    let errors = errors.as_array().unwrap().clone();
    assert_eq!(errors.len(), 3, "{errors:?}");
    for (n, e) in errors.iter().enumerate() {
        assert_eq!(e["attempt"], n + 1, "{e}");
        let text = e["error"].as_str().unwrap();
        assert!(text.contains("probe serialization failure"), "{text}");
        assert!(text.contains("gave up after 2 retries"), "{text}");
    }
    // Each attempt ran the body once plus its two transient retries.
    let (runs, _) = common::processes::counted(&pool, id).await;
    assert_eq!(runs, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_its_kinds_timeout_is_aborted_and_fails() {
    let config = fast(&[("worker.timeouts", json!({SLEEP: 300}))]);
    assert_eq!(
        config.worker.job_timeout_ms, 3_600_000,
        "the default stays generous"
    );
    let (pool, _db) = migrated_pool(&config).await;
    let hung = enqueue(
        &pool,
        SLEEP,
        json!({"ms": 600_000, "ignore_token": true}),
        2,
    )
    .await;
    let mut worker = WorkerProcess::start(&config);
    wait_state(&pool, hung, "failed").await;
    let (_, attempt, _, errors, _, owner) = job(&pool, hung).await;
    assert_eq!((attempt, owner), (2, None));
    let errors = errors.as_array().unwrap().clone();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for e in &errors {
        assert_eq!(e["error"], "timed out after 300ms", "{e}");
    }
    assert!(errors[0]["retry_at"].is_string() && errors[1]["retry_at"].is_null());
    // The worker goes on; kinds without their own timeout use the default.
    let other = enqueue(
        &pool,
        STUBBORN,
        json!({"wait_ms": 600, "then": "result"}),
        1,
    )
    .await;
    wait_state(&pool, other, "completed").await;
    assert!(worker.is_running(), "{}", worker.log_text());
}

/// What the database refuses to store ends the job at once, saying why, instead of leaving it
/// running until its lease expires and running it again: a result jsonb cannot hold fails it
/// after its one run; a failure message holding NUL is kept with the NUL marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ending_the_database_refuses_fails_the_job_at_once() {
    let (pool, _db, _worker, _) = with_worker().await;
    let ending = |then: &str| json!({"wait_ms": 0, "then": then});
    let unstorable = enqueue(&pool, STUBBORN, ending("unstorable"), 3).await;
    let with_nul = enqueue(&pool, STUBBORN, ending("fail_with_nul"), 1).await;
    wait_state(&pool, unstorable, "failed").await;
    let (_, attempt, result, errors, _, owner) = job(&pool, unstorable).await;
    assert_eq!((attempt, result, owner), (1, None, None));
    let text = errors[0]["error"].as_str().unwrap();
    assert!(text.contains("refused the job's ending"), "{errors}");
    wait_state(&pool, with_nul, "failed").await;
    let (_, attempt, _, errors, _, _) = job(&pool, with_nul).await;
    assert_eq!((attempt, &errors[0]["error"]), (1, &json!("a\u{FFFD}b")));
}
