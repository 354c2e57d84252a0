//! A cancel that lands while a settlement is in its final step (replacing `settlements` in the
//! batch that completes the job) still ends the job CANCELLED, and `settlements` keeps exactly
//! the rows it had. The test holds the advisory lock finalize takes on `settlements`, so the
//! job is provably inside its completing transaction when the cancel is requested.

mod common;
#[path = "settlement_support.rs"]
mod support;

use common::processes::{wait_for, wait_state};
use common::spawn_app_with;
use serde_json::{Value, json};
use settle_workers::Worker;
use sqlx::{Connection, PgConnection};
use std::time::Duration;
use support::{day, reference, settlements};
use tokio_util::sync::CancellationToken;

const LOCK: &str = "hashtextextended('settle:settlements', 0)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_finalize_ends_cancelled_and_leaves_settlements_as_they_were() {
    let app = spawn_app_with(&[
        ("worker.batch_size", json!(50)),
        ("settlement.parallel_parts", json!(2)),
    ])
    .await;
    let registry = settle::worker::registry(&app.config);
    let stop = CancellationToken::new();
    let settings = settle::worker::settings(&app.config.worker);
    let worker = tokio::spawn(Worker::new(app.pool.clone(), settings, registry).run(stop.clone()));
    let (from, to) = (day("2025-01-01"), day("2025-01-03"));

    // A first settlement gives the table rows to keep.
    let first = support::random_transactions(21, 1500, 4, 3);
    support::store(&app.pool, &first).await;
    let done = app.post_settlement("2025-01-01", "2025-01-03").await;
    wait_state(&app.pool, done, "completed").await;
    let before = settlements(&app.pool, from, to).await;
    assert!(!before.is_empty());
    assert_eq!(before, reference(&first, from, to, chrono_tz::Tz::UTC));

    // New input that a completed second job would show.
    let more = support::random_transactions(22, 1500, 4, 3);
    support::store(&app.pool, &more).await;
    let mut holder = PgConnection::connect(&app.config.database.url)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "select pg_advisory_lock({LOCK})"
    )))
    .execute(&mut holder)
    .await
    .unwrap();
    let holder_pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    let id = app.post_settlement("2025-01-01", "2025-01-03").await;
    wait_for(
        Duration::from_secs(60),
        "finalize waiting for the settlements lock",
        || async {
            let waiting: bool = sqlx::query_scalar(
                "select exists (select 1 from pg_stat_activity
                                where $1 = any(pg_blocking_pids(pid)))",
            )
            .bind(holder_pid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
            waiting.then_some(())
        },
    )
    .await;
    let (status, body) = app
        .post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, &body["status"]),
        (202, &json!("CANCELLING")),
        "{body}"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "select pg_advisory_unlock({LOCK})"
    )))
    .execute(&mut holder)
    .await
    .unwrap();

    wait_state(&app.pool, id, "cancelled").await;
    assert_eq!(settlements(&app.pool, from, to).await, before);
    let (result, processed, total): (Option<Value>, i64, Option<i64>) =
        sqlx::query_as("select result, processed, total from jobs where id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(result, None);
    assert_eq!(
        Some(processed),
        total,
        "it was cancelled after all its batches"
    );
    let results: i64 =
        sqlx::query_scalar("select count(*) from settlement_results where job_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(results, 0, "no CSV for a cancelled job");
    let working: i64 =
        sqlx::query_scalar("select count(*) from settlement_parts where job_id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(working, 0, "the cancelled job's working rows are discarded");
    stop.cancel();
    worker.await.unwrap();
}
