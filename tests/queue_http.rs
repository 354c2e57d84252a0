//! The job endpoints over real HTTP: shapes, codes, keyset listing and cancellation.

mod common;

use common::processes::enqueue;
use common::{assert_error, spawn_app};
use serde_json::json;

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

#[tokio::test]
async fn a_completed_settlement_links_its_csv_and_shows_full_progress() {
    let app = spawn_app().await;
    let id = enqueue(
        &app.pool,
        "settlement",
        json!({"from": "2025-01-01", "to": "2025-01-02"}),
        3,
    )
    .await;
    sqlx::query(
        "update jobs set state = 'completed', processed = 10, total = 10, attempt = 1,
             started_at = now(), finished_at = now() where id = $1",
    )
    .bind(id)
    .execute(&app.pool)
    .await
    .unwrap();
    let (_, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(job["status"], "COMPLETED");
    assert_eq!(job["progress"], 100);
    assert_eq!(job["download_url"], format!("/downloads/{id}.csv"));
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
