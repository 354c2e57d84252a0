//! How a settlement job fixes its input. A range holding the history's first and last rows
//! takes its id span from the primary key's two ends and counts its rows as it reads them: its
//! `total` bounds the count (the span's ids) until the job completes with the exact count. Any
//! other range is counted up front through the `(paid_at, id)` index.

mod common;

use chrono_tz::Tz;
use common::ops::settling_app;
use common::processes::wait_state;
use common::settlement as support;
use serde_json::json;
use settle::settlement::plan::{self, Plan};
use settle::settlement::transactions::{NewTransaction, Status};
use settle::settlement::{DateRange, Settings};
use sqlx::PgPool;
use support::{at, day, txn};

/// Stored in id order: one row paid on 01-01 (the lowest id), `middle` rows alternating
/// between 01-02 and 01-09, and one paid on 01-03 (the highest id).
fn history(middle: usize) -> Vec<NewTransaction> {
    let mut rows = vec![txn("m1", 100, 1, Status::Paid, at("2025-01-01T08:00:00Z"))];
    rows.extend((0..middle).map(|i| {
        let paid_at = if i % 2 == 0 {
            "2025-01-02T12:00:00Z"
        } else {
            "2025-01-09T12:00:00Z"
        };
        txn("m2", 10 + i as i64, 1, Status::Paid, at(paid_at))
    }));
    rows.push(txn("m3", 300, 3, Status::Paid, at("2025-01-03T20:00:00Z")));
    rows
}

/// The plan a first start fixes for `from..=to`, rolled back (no job holds it).
async fn fixed_input(pool: &PgPool, settings: &Settings, from: &str, to: &str) -> Plan {
    let range = DateRange::new(day(from), day(to), 366).unwrap();
    let high_water = plan::high_water_mark(pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let plan = plan::start(&mut tx, 1, range, settings, 0, Some(high_water))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    plan
}

/// `(status, processed, total)` of a finished job.
async fn ending(pool: &PgPool, id: i64) -> (String, i64, Option<i64>) {
    sqlx::query_as("select state::text, processed, total from all_jobs where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_holding_both_ends_is_counted_as_it_is_read() {
    let (app, _worker) = settling_app(7, 2).await;
    let rows = history(40);
    support::store(&app.pool, &rows).await;
    let within = support::paid_within(&rows, "2025-01-01", "2025-01-03", Tz::UTC);
    assert_eq!(within, 22, "the first, the last and every other middle row");

    let settings = Settings::new(&app.config.settlement, 7);
    let plan = fixed_input(&app.pool, &settings, "2025-01-01", "2025-01-03").await;
    // No count up front: the total is the span's ids, every stored row here.
    assert_eq!(plan.run.total, rows.len() as i64);
    assert_eq!(
        plan.parts.first().unwrap().lo_id + 1,
        first_id(&app.pool).await
    );

    let (status, body) = app
        .post(
            "/api/v1/jobs/settlement",
            &json!({"from": "2025-01-01", "to": "2025-01-03"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_i64().unwrap();
    wait_state(&app.pool, id, "completed").await;
    // The completion records what the job read: the exact count.
    assert_eq!(
        ending(&app.pool, id).await,
        ("completed".to_owned(), within, Some(within))
    );
    let (_, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(
        (job["progress"].as_i64(), job["total"].as_i64()),
        (Some(100), Some(within))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_missing_an_end_is_counted_up_front() {
    let (app, _worker) = settling_app(7, 2).await;
    let rows = history(40);
    support::store(&app.pool, &rows).await;
    let settings = Settings::new(&app.config.settlement, 7);
    // The lowest id is paid on 01-01, outside 01-02..=01-09.
    let plan = fixed_input(&app.pool, &settings, "2025-01-02", "2025-01-09").await;
    let within = support::paid_within(&rows, "2025-01-02", "2025-01-09", Tz::UTC);
    assert_eq!((plan.run.total, within), (41, 41));
    // The span starts at the first row of the range, not at the table's.
    assert_eq!(plan.parts.first().unwrap().lo_id, first_id(&app.pool).await);
}

async fn first_id(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select min(id) from transactions")
        .fetch_one(pool)
        .await
        .unwrap()
}
