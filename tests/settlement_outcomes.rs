//! How a settlement ends when things go wrong at the worst moment, with real worker processes:
//! the newest input wins whatever order overlapping jobs finish in (a frozen worker's older job
//! completing last), and a final commit whose reply is lost leaves either a COMPLETED job with
//! its CSV or a job that resumes and completes.

mod common;

use std::time::Duration;

use chrono_tz::Tz;
use common::commit_cut::{Cut, CutProxy};
use common::processes::{WorkerProcess, wait_for, wait_mid_way, wait_state};
use common::settlement as support;
use common::{TestApp, spawn_app_with};
use nix::sys::signal::Signal;
use serde_json::json;
use support::{day, reference, settlements};

/// A worker process with `batch` rows per batch and a `lease_ms` lease, on `database_url`.
fn worker(app: &TestApp, batch: i64, lease_ms: u64, database_url: &str) -> WorkerProcess {
    WorkerProcess::start_with(
        &app.config,
        &[
            ("SETTLE_DATABASE__URL", database_url.to_owned()),
            ("SETTLE_WORKER__BATCH_SIZE", batch.to_string()),
            ("SETTLE_WORKER__LEASE_MS", lease_ms.to_string()),
            ("SETTLE_WORKER__HEARTBEAT_MS", (lease_ms / 4).to_string()),
            (
                "SETTLE_WORKER__SHUTDOWN_GRACE_MS",
                (lease_ms / 2).to_string(),
            ),
            ("SETTLE_SETTLEMENT__PARALLEL_PARTS", "2".to_owned()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_workers_older_input_completing_last_leaves_the_newest_rows() {
    let app = spawn_app_with(&[("worker.poll_interval_ms", json!(200))]).await;
    let url = app.config.database.url.clone();
    let old = support::store_random(&app.pool, 50, 20_000, 6, 4).await;
    // A fixes its input on the first worker, which is frozen mid-job.
    let a = app.post_settlement("2025-01-01", "2025-01-04").await;
    let first = worker(&app, 50, 4000, &url);
    wait_mid_way(&app.pool, a).await;
    first.signal(Signal::SIGSTOP);
    // New transactions arrive; B, over part of A's range, completes on another worker.
    let new = support::store_random(&app.pool, 51, 3_000, 6, 4).await;
    let mut second = worker(&app, 1_000_000, 4000, &url);
    let b = app.post_settlement("2025-01-02", "2025-01-03").await;
    wait_state(&app.pool, b, "completed").await;
    // A's worker dies; A is rescued by the second worker and completes last.
    first.kill().await;
    wait_state(&app.pool, a, "completed").await;
    let (a_done, b_done, a_attempts): (f64, f64, i32) = sqlx::query_as(
        "select extract(epoch from a.finished_at)::float8, extract(epoch from b.finished_at)::float8,
                a.attempt
         from all_jobs a, all_jobs b where a.id = $1 and b.id = $2",
    )
    .bind(a)
    .bind(b)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(a_done > b_done, "A must complete after B");
    assert_eq!(a_attempts, 2, "A was rescued: {}", second.log_text());

    let (expected, newest) = support::newest_wins(&old, &new);
    assert_eq!(
        settlements(&app.pool, day("2025-01-01"), day("2025-01-04")).await,
        expected
    );
    assert_eq!(
        support::downloaded(&app, b).await,
        newest,
        "B's CSV still matches the table"
    );
    assert_eq!(support::downloaded(&app, a).await, expected);
    assert!(second.terminate().await, "{}", second.log_text());
}

/// Runs a settlement on a worker whose connections pass through a proxy that cuts the final
/// commit's connection once, `cut` deciding whether the commit reached the server.
async fn final_commit_cut(cut: Cut) {
    let app = spawn_app_with(&[("worker.poll_interval_ms", json!(200))]).await;
    let rows = support::store_random(&app.pool, 60, 5_000, 5, 3).await;
    let server = common::server_url();
    let upstream = server
        .rsplit('@')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .expect("TEST_DATABASE_URL host:port");
    let proxy = CutProxy::start(
        upstream,
        b"insert into settlement_results",
        b"COMMIT",
        cut,
        1,
    )
    .await;
    let database = app
        .config
        .database
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let via_proxy = format!("postgres://postgres@{}/{database}", proxy.addr);
    let mut w = worker(&app, 1_000, 4000, &via_proxy);
    let id = app.post_settlement("2025-01-01", "2025-01-03").await;
    wait_state(&app.pool, id, "completed").await;
    assert_eq!(
        proxy.cuts_made(1),
        1,
        "the final commit's connection was cut"
    );
    let expected = reference(&rows, day("2025-01-01"), day("2025-01-03"), Tz::UTC);
    assert_eq!(support::downloaded(&app, id).await, expected);
    assert_eq!(
        settlements(&app.pool, day("2025-01-01"), day("2025-01-03")).await,
        expected
    );
    let results = support::scalar(
        &app.pool,
        &format!("select count(*) from settlement_results where job_id = {id}"),
    )
    .await;
    assert_eq!(
        results as usize,
        expected.len(),
        "the result was stored once"
    );
    // The commit landed (one finalize) or the job resumed and finalized again (two).
    let finalizes = if cut == Cut::AfterForwarding { 1 } else { 2 };
    wait_for(
        Duration::from_secs(10),
        "the worker's finalize logs",
        || async {
            (w.log_text().matches("settlement finalized").count() >= finalizes).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logged = w.log_text().matches("settlement finalized").count();
    assert_eq!(logged, finalizes, "{}", w.log_text());
    assert!(w.terminate().await, "{}", w.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_commit_that_landed_but_whose_reply_was_lost_leaves_the_job_completed() {
    final_commit_cut(Cut::AfterForwarding).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_commit_that_never_arrived_leaves_a_job_that_resumes_and_completes() {
    final_commit_cut(Cut::BeforeForwarding).await;
}
