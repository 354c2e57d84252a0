//! The job endpoints over real HTTP: shapes, codes, keyset listing and cancellation.

mod common;

use common::ops::start_worker;
use common::processes::{enqueue, job_in_state, wait_state};
use common::{assert_refused, spawn_app};
use serde_json::{Value, json};
use settle::jobs::kind::{NOOP, SLEEP};
use settle::settlement::results::HEADER;

#[tokio::test]
async fn a_job_reads_back_in_the_spec_shape() {
    let app = spawn_app().await;
    let id = enqueue(&app.pool, SLEEP, json!({"ms": 5}), 3).await;
    let (status, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["job_id"], id);
    assert_eq!(job["kind"], SLEEP);
    assert_eq!(job["status"], "QUEUED");
    assert_eq!(
        (job["progress"].as_i64(), job["processed"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(job["total"], 0);
    assert!(job["download_url"].is_null() && job["error"].is_null());
    assert_eq!(job["attempt"], 0);
    assert!(job["created_at"].is_string() && job["started_at"].is_null());
    assert!(job["finished_at"].is_null());
    assert_eq!(job["params"], json!({"ms": 5}));

    assert_refused(app.get("/api/v1/jobs/987654").await, 404, "NOT_FOUND");
    assert_refused(app.get("/api/v1/jobs/abc").await, 400, "INVALID_PATH");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_settlement_links_its_csv_and_shows_full_progress() {
    let app = spawn_app().await;
    let worker = start_worker(&app);
    let (status, body) = app
        .post(
            "/api/v1/transactions",
            &json!({"merchant_id": "m-1", "external_id": "ch_1", "amount_cents": 10000,
                    "fee_cents": 320, "status": "PAID", "paid_at": "2025-01-01T12:00:00Z"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = app.post_settlement("2025-01-01", "2025-01-02").await;
    wait_state(&app.pool, id, "completed").await;

    let (_, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "COMPLETED");
    assert_eq!(
        (job["progress"].as_i64(), job["processed"].as_i64()),
        (Some(100), Some(1))
    );
    assert_eq!(job["download_url"], format!("/downloads/{id}.csv"));
    // The link leads to the job's CSV: its one merchant-day, net of the fee.
    let csv = app.http.get(app.url(job["download_url"].as_str().unwrap()));
    let (status, text) = common::status_and_text(csv.send().await.unwrap()).await;
    assert_eq!(
        (status, text),
        (200, format!("{HEADER}\nm-1,2025-01-01,10000,320,9680,1\n"))
    );
    worker.stop().await;
}

/// The ids of a page of jobs, in its order.
fn job_ids(page: &Value) -> Vec<i64> {
    let data = page["data"].as_array().expect("a page of jobs");
    data.iter().map(|j| j["job_id"].as_i64().unwrap()).collect()
}

#[tokio::test]
async fn jobs_list_newest_first_by_keyset_and_filter_by_status_and_kind() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let kind = if i % 2 == 0 { NOOP } else { SLEEP };
        ids.push(enqueue(&app.pool, kind, json!({"ms": 1}), 3).await);
    }
    let (status, _) = app
        .post(&format!("/api/v1/jobs/{}/cancel", ids[0]), &json!({}))
        .await;
    assert_eq!(status, 202);

    let (status, page) = app.get("/api/v1/jobs?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(job_ids(&page), vec![ids[4], ids[3]]);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, page) = app
        .get(&format!("/api/v1/jobs?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(job_ids(&page), vec![ids[2], ids[1]]);

    let (_, page) = app
        .get(&format!("/api/v1/jobs?kind={NOOP}&status=QUEUED"))
        .await;
    assert_eq!(job_ids(&page), vec![ids[4], ids[2]]);
    assert!(page["next_cursor"].is_null());
    let (_, page) = app.get("/api/v1/jobs?status=CANCELLED").await;
    assert_eq!(page["data"][0]["job_id"], ids[0]);

    let states = [("status=SLEEPING", 422, "INVALID_STATUS")];
    app.assert_list_refuses("/api/v1/jobs", &states).await;
}

#[tokio::test]
async fn cancel_answers_per_state() {
    let app = spawn_app().await;
    let queued = enqueue(&app.pool, NOOP, json!({}), 3).await;
    let running = job_in_state(&app.pool, "running").await;
    let done = job_in_state(&app.pool, "failed").await;

    let accepted = |id: i64, status: &str| (202, json!({"job_id": id, "status": status}));
    assert_eq!(app.cancel(queued).await, accepted(queued, "CANCELLED"));
    // Cancelling a cancelled job changes nothing.
    assert_eq!(app.cancel(queued).await, accepted(queued, "CANCELLED"));
    assert_eq!(app.cancel(running).await, accepted(running, "CANCELLING"));
    let (_, job) = app.get(&format!("/api/v1/jobs/{running}")).await;
    assert_eq!(job["status"], "CANCELLING");
    assert_refused(app.cancel(done).await, 409, "JOB_FINISHED");
    assert_refused(app.cancel(424242).await, 404, "NOT_FOUND");
}
