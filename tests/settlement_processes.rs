//! Settlement with real `settle worker` processes and real signals: a worker SIGKILLed
//! mid-settlement is replaced and the result is exact; a running job cancelled through the API
//! stops, writes no CSV and leaves `settlements` as it was.

mod common;

use chrono_tz::Tz;
use common::processes::{WorkerProcess, short_lease, wait_mid_way, wait_state};
use common::settlement as support;
use common::{TestApp, spawn_app_with};
use serde_json::{Value, json};
use settle::settlement::transactions::{NewTransaction, Status};
use support::{day, reference, settlements};

fn overrides(batch: i64) -> Vec<(&'static str, Value)> {
    let mut overrides = short_lease(2000, 500);
    overrides.extend([
        ("worker.batch_size", json!(batch)),
        ("settlement.parallel_parts", json!(2)),
        ("settlement.time_zone", json!("America/New_York")),
    ]);
    overrides
}

/// A worker process with the test's settlement settings (the helper passes `[worker]` only).
/// Its legacy results directory is its own and never created: the api and the workers share
/// no disk, only Postgres.
fn worker(app: &TestApp) -> WorkerProcess {
    let s = &app.config.settlement;
    let own_dir = std::env::temp_dir().join(format!("settle-worker-{}", uuid::Uuid::new_v4()));
    let env = [
        (
            "SETTLE_SETTLEMENT__RESULTS_DIR",
            own_dir.to_string_lossy().into_owned(),
        ),
        ("SETTLE_SETTLEMENT__TIME_ZONE", s.time_zone.clone()),
        (
            "SETTLE_SETTLEMENT__PARALLEL_PARTS",
            s.parallel_parts.to_string(),
        ),
    ];
    WorkerProcess::start_with(&app.config, &env)
}

/// `settlements` of the test's days (in its zone) are those of `rows`; returns them.
async fn assert_settled(app: &TestApp, rows: &[NewTransaction]) -> support::Settled {
    let (from, to) = (day("2025-01-01"), day("2025-01-05"));
    let expected = reference(rows, from, to, Tz::America__New_York);
    assert_eq!(settlements(&app.pool, from, to).await, expected);
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_settlement_is_replaced_and_the_result_is_exact() {
    let app = spawn_app_with(&overrides(40)).await;
    let rows = support::store_random(&app.pool, 21, 30_000, 8, 5).await;
    let id = app.post_settlement("2025-01-01", "2025-01-05").await;
    let first = worker(&app);
    wait_mid_way(&app.pool, id).await;
    first.kill().await;
    let high_water = common::scalar_of(
        &app.pool,
        "select high_water_id from settlement_runs where job_id = $1",
        id,
    )
    .await;
    let committed = support::scalar(
        &app.pool,
        "select coalesce(sum(processed), 0)::int8 from settlement_parts",
    )
    .await;
    // Rows arriving after the job started are not part of its input.
    support::store_random(&app.pool, 22, 500, 8, 5).await;

    let mut second = worker(&app);
    wait_state(&app.pool, id, "completed").await;
    let (attempt, processed, total): (i32, i64, i64) =
        sqlx::query_as("select attempt, processed, total from all_jobs where id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(attempt, 2, "{}", second.log_text());
    let within = support::paid_within(&rows, "2025-01-01", "2025-01-05", Tz::America__New_York);
    assert_eq!((processed, total), (within, within));
    assert!(committed > 0, "the first worker had committed batches");
    assert!(high_water > 0);
    let expected = assert_settled(&app, &rows).await;
    assert_eq!(support::downloaded(&app, id).await, expected);
    assert!(second.terminate().await, "{}", second.log_text());
}

/// A crash that takes a run's latest batches (committed asynchronously) leaves the database
/// behind the worker's own account of its parts: staged here by rewinding every part, its sums
/// and reads gone, while a part's batch waits to move its cursor. The worker finds the database behind,
/// resumes from what it kept, and the result is exact, on the same attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_latest_batches_the_database_lost_resumes_and_is_exact() {
    let app = spawn_app_with(&overrides(40)).await;
    let rows = support::store_random(&app.pool, 23, 20_000, 8, 5).await;
    let id = app.post_settlement("2025-01-01", "2025-01-05").await;
    let mut worker = worker(&app);
    wait_mid_way(&app.pool, id).await;
    let mut crash = common::rows_locked(
        &app.pool,
        "select 1 from settlement_parts where job_id = $1 for update",
        id,
    )
    .await;
    common::wait_for_lock_waiter(&app.pool, "update settlement_parts").await;
    sqlx::query(
        "with rewound as (
             update settlement_parts set cursor_id = lo_id, processed = 0 where job_id = $1
         ), unread as (
             delete from settlement_reads where job_id = $1
         )
         delete from settlement_batches where job_id = $1",
    )
    .bind(id)
    .execute(&mut *crash)
    .await
    .unwrap();
    crash.commit().await.unwrap();
    wait_state(&app.pool, id, "completed").await;
    assert_settled(&app, &rows).await;
    let log = worker.log_text();
    assert!(
        log.contains("the database lost this run's latest batches"),
        "{log}"
    );
    let attempt = common::scalar_of(
        &app.pool,
        "select attempt::int8 from all_jobs where id = $1",
        id,
    );
    assert_eq!(attempt.await, 1, "{log}");
    assert!(worker.terminate().await, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_settlement_cancelled_through_the_api_leaves_everything_as_it_was() {
    let app = spawn_app_with(&overrides(20)).await;
    support::store_random(&app.pool, 23, 30_000, 8, 3).await;
    // An earlier settlement of the same days, which the cancelled job must leave alone.
    let mut w = worker(&app);
    let done = app.post_settlement("2025-01-01", "2025-01-03").await;
    wait_state(&app.pool, done, "completed").await;
    let before = settlements(&app.pool, day("2025-01-01"), day("2025-01-03")).await;
    assert!(!before.is_empty());

    support::store_random(&app.pool, 24, 500, 8, 3).await;
    let id = app.post_settlement("2025-01-01", "2025-01-03").await;
    let processed_then = wait_mid_way(&app.pool, id).await;
    let (status, body) = app.cancel(id).await;
    assert_eq!(status, 202, "{body}");
    wait_state(&app.pool, id, "cancelled").await;
    let processed = common::processes::processed(&app.pool, id).await;
    assert!(
        processed < 30_500 / 2,
        "stopped early: {processed_then} then {processed}"
    );
    let (status, _) = app.get(&format!("/downloads/{id}.csv")).await;
    assert_eq!(status, 404);
    assert_eq!(
        settlements(&app.pool, day("2025-01-01"), day("2025-01-03")).await,
        before
    );
    // Cancelling again is a no-op; the finished job refuses.
    let (status, _) = app.cancel(id).await;
    assert_eq!(status, 202);
    let (status, body) = app.cancel(done).await;
    assert_eq!(status, 409, "{body}");
    assert!(w.terminate().await, "{}", w.log_text());
}

/// An operator's fix of stored rows while the job runs (the lowest-id paid row refunded and
/// the highest-id refunded one paid, in one statement: at no time were both paid) is read by
/// some batches and not by others; the job sums their days again as it finishes and settles
/// exactly the fixed input, on the same attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fix_of_stored_rows_during_the_run_is_settled_as_fixed() {
    let app = spawn_app_with(&overrides(40)).await;
    let mut rows = support::store_random(&app.pool, 24, 20_000, 8, 5).await;
    let (paid, refunded): (String, String) = sqlx::query_as(
        "select (select external_id from transactions where status = 'PAID'
                 and paid_at >= '2025-01-02' and paid_at < '2025-01-05' order by id limit 1),
                (select external_id from transactions where status = 'REFUNDED'
                 and paid_at >= '2025-01-02' and paid_at < '2025-01-05' order by id desc limit 1)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let id = app.post_settlement("2025-01-01", "2025-01-05").await;
    let mut worker = worker(&app);
    // The parts read the lowest ids first and the highest last.
    wait_mid_way(&app.pool, id).await;
    sqlx::query(
        "update transactions
         set status = case external_id when $1 then 'REFUNDED' else 'PAID' end
         where external_id in ($1, $2)",
    )
    .bind(&paid)
    .bind(&refunded)
    .execute(&app.pool)
    .await
    .unwrap();
    for row in &mut rows {
        if row.external_id == paid {
            row.status = Status::Refunded;
        } else if row.external_id == refunded {
            row.status = Status::Paid;
        }
    }
    wait_state(&app.pool, id, "completed").await;
    assert!(worker.terminate().await, "{}", worker.log_text());
    let attempt = common::scalar_of(
        &app.pool,
        "select attempt::int8 from all_jobs where id = $1",
        id,
    );
    assert_eq!(attempt.await, 1);
    let expected = assert_settled(&app, &rows).await;
    assert_eq!(support::downloaded(&app, id).await, expected);
}

/// A worker settles 2025-01-01..=10 while `change` (statements changing stored rows) runs
/// mid-run; returns the app, the job and the worker's log once the job completed, its
/// `settlements` those of the table as it is now and its `processed` never gone back.
async fn changed_mid_run(change: &str) -> (TestApp, i64, String) {
    let app = spawn_app_with(&overrides(40)).await;
    support::store_random(&app.pool, 25, 20_000, 8, 11).await;
    support::watch_progress(&app.pool).await;
    let id = app.post_settlement("2025-01-01", "2025-01-10").await;
    let mut worker = worker(&app);
    wait_mid_way(&app.pool, id).await;
    let change = sqlx::AssertSqlSafe(change.to_owned());
    sqlx::raw_sql(change).execute(&app.pool).await.unwrap();
    wait_state(&app.pool, id, "completed").await;
    assert!(worker.terminate().await, "{}", worker.log_text());
    let (from, to) = (day("2025-01-01"), day("2025-01-10"));
    let now = support::settled_now(&app.pool, (from, to), Tz::America__New_York, i64::MAX).await;
    assert_eq!(settlements(&app.pool, from, to).await, now);
    assert_eq!(support::downloaded(&app, id).await, now);
    assert_eq!(support::progress_gone_back(&app.pool).await, vec![]);
    let attempt = "select attempt::int8 from all_jobs where id = $1";
    assert_eq!(common::scalar_of(&app.pool, attempt, id).await, 1);
    (app, id, worker.log_text())
}

/// Refunds of the lowest-id and the highest-id PAID row of each of nine days (one read early,
/// one late).
const REFUNDS_EACH_DAY: &str = "update transactions set status = 'REFUNDED'
    where id in (select unnest(array[min(id), max(id)]) from transactions
                 where status = 'PAID'
                   and paid_at >= '2025-01-01T12:00:00Z' and paid_at < '2025-01-10T00:00:00Z'
                 group by (paid_at at time zone 'UTC')::date)";

/// Refund traffic on every day of a job's range while it runs: the finish corrects the sums
/// by the refunds its batches did not see, and the job completes without starting over (it
/// fixed its input once). (The release before summed at most 7 changed days again and started
/// over past them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_on_every_day_during_the_run_are_corrected_without_starting_over() {
    let (_app, _id, log) = changed_mid_run(REFUNDS_EACH_DAY).await;
    assert_eq!(log.matches("settlement input fixed").count(), 1, "{log}");
    assert!(!log.contains("changed while it ran"), "{log}");
}

/// A TRUNCATE, which leaves no rows to correct by, starts the job over on a fresh input, and
/// its progress holds where it was instead of going back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_over_keeps_the_progress_where_it_was() {
    let (_app, _id, log) = changed_mid_run("truncate transactions").await;
    assert_eq!(log.matches("settlement input fixed").count(), 2, "{log}");
    assert!(log.contains("changed while it ran"), "{log}");
}
