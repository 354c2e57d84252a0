//! The job endpoints over real HTTP: shapes, codes, keyset listing and cancellation.

mod common;

use common::processes::{enqueue, wait_state};
use common::{assert_error, spawn_app};
use serde_json::json;
use settle::settlement::results::HEADER;
use settle_workers::Worker;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_job_reads_back_in_the_spec_shape() {
    let app = spawn_app().await;
    let id = enqueue(&app.pool, "sleep", json!({"ms": 5}), 3).await;
    let (status, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["job_id"], id);
    assert_eq!(job["kind"], "sleep");
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

    let (status, body) = app.get("/api/v1/jobs/987654").await;
    assert_eq!(status, 404);
    assert_error(&body, "NOT_FOUND");
    let (status, body) = app.get("/api/v1/jobs/abc").await;
    assert_eq!(status, 400);
    assert_error(&body, "INVALID_PATH");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_settlement_links_its_csv_and_shows_full_progress() {
    let app = spawn_app().await;
    let stop = CancellationToken::new();
    let worker = Worker::new(
        app.pool.clone(),
        settle::worker::settings(&app.config.worker),
        settle::worker::registry(&app.config),
    );
    let running = tokio::spawn(worker.run(stop.clone()));
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
    let csv = app
        .http
        .get(app.url(job["download_url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert_eq!(
        csv.text().await.unwrap(),
        format!("{HEADER}\nm-1,2025-01-01,10000,320,9680,1\n")
    );
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn jobs_list_newest_first_by_keyset_and_filter_by_status_and_kind() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let kind = if i % 2 == 0 { "noop" } else { "sleep" };
        ids.push(enqueue(&app.pool, kind, json!({"ms": 1}), 3).await);
    }
    let (status, _) = app
        .post(&format!("/api/v1/jobs/{}/cancel", ids[0]), &json!({}))
        .await;
    assert_eq!(status, 202);

    let (status, page) = app.get("/api/v1/jobs?limit=2").await;
    assert_eq!(status, 200, "{page}");
    let first: Vec<i64> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_i64().unwrap())
        .collect();
    assert_eq!(first, vec![ids[4], ids[3]]);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, page) = app
        .get(&format!("/api/v1/jobs?limit=2&cursor={cursor}"))
        .await;
    let second: Vec<i64> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_i64().unwrap())
        .collect();
    assert_eq!(second, vec![ids[2], ids[1]]);

    let (_, page) = app.get("/api/v1/jobs?kind=noop&status=QUEUED").await;
    let queued_noops: Vec<i64> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_i64().unwrap())
        .collect();
    assert_eq!(queued_noops, vec![ids[4], ids[2]]);
    assert!(page["next_cursor"].is_null());
    let (_, page) = app.get("/api/v1/jobs?status=CANCELLED").await;
    assert_eq!(page["data"][0]["job_id"], ids[0]);

    let (status, body) = app.get("/api/v1/jobs?status=SLEEPING").await;
    assert_eq!(status, 422);
    assert_error(&body, "INVALID_STATUS");
    let (status, body) = app.get("/api/v1/jobs?cursor=xyz").await;
    assert_eq!(status, 400);
    assert_error(&body, "INVALID_CURSOR");
}

#[tokio::test]
async fn cancel_answers_per_state() {
    let app = spawn_app().await;
    let queued = enqueue(&app.pool, "noop", json!({}), 3).await;
    let running = enqueue(&app.pool, "noop", json!({}), 3).await;
    let done = enqueue(&app.pool, "noop", json!({}), 3).await;
    sqlx::query(
        "update jobs set state = 'running', attempt = 1, lease_owner = 'elsewhere',
             lease_expires_at = now() + interval '1 hour', started_at = now() where id = $1",
    )
    .bind(running)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("update jobs set state = 'failed', finished_at = now() where id = $1")
        .bind(done)
        .execute(&app.pool)
        .await
        .unwrap();

    let (status, body) = app
        .post(&format!("/api/v1/jobs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, body),
        (202, json!({"job_id": queued, "status": "CANCELLED"}))
    );
    let (status, body) = app
        .post(&format!("/api/v1/jobs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, body),
        (202, json!({"job_id": queued, "status": "CANCELLED"}))
    );
    let (status, body) = app
        .post(&format!("/api/v1/jobs/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, body),
        (202, json!({"job_id": running, "status": "CANCELLING"}))
    );
    let (_, job) = app.get(&format!("/api/v1/jobs/{running}")).await;
    assert_eq!(job["status"], "CANCELLING");
    let (status, body) = app
        .post(&format!("/api/v1/jobs/{done}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409);
    assert_error(&body, "JOB_FINISHED");
    let (status, body) = app.post("/api/v1/jobs/424242/cancel", &json!({})).await;
    assert_eq!(status, 404);
    assert_error(&body, "NOT_FOUND");
}
