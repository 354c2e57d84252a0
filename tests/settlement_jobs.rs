//! Settlement jobs through the HTTP API and the queue: enqueue (validation, idempotency,
//! `Location`), run to COMPLETED, download, and cancel. The worker here is the settle-workers
//! runtime in this process with the settlement kind registered; `settlement_processes.rs`
//! repeats the crash and cancel cases with real `settle worker` processes.

mod common;

use std::time::Duration;

use chrono_tz::Tz;
use common::ops::{InProcessWorker, settling_app, start_worker};
use common::processes::{job_row, job_start, wait_processed, wait_state};
use common::settlement as support;
use common::{TestApp, assert_error, spawn_app_with};
use serde_json::{Value, json};
use settle::settlement::transactions::Status;
use support::{day, parse_csv, reference, settlements};

/// The app plus an in-process worker that stops when dropped.
async fn harness(overrides: &[(&str, Value)]) -> (TestApp, InProcessWorker) {
    let app = spawn_app_with(overrides).await;
    let worker = start_worker(&app);
    (app, worker)
}

async fn post_job(app: &TestApp, body: &Value, key: Option<&str>) -> (u16, Value, Option<String>) {
    let mut request = app.http.post(app.url("/api/v1/jobs/settlement")).json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, body) = common::status_and_json(response).await;
    (status, body, location)
}

async fn download(app: &TestApp, path: &str) -> (u16, String, String) {
    let response = app.http.get(app.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_to_job_to_completed_csv_and_table() {
    let (app, _worker) = settling_app(64, 3).await;
    let rows = support::random_transactions(11, 2500, 6, 4);
    for chunk in rows.chunks(500) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|t| {
                json!({"merchant_id": t.merchant_id, "external_id": t.external_id,
                       "amount_cents": t.amount_cents,
                       "fee_cents": t.fee_cents, "status": t.status.as_str(),
                       "paid_at": t.paid_at.to_rfc3339()})
            })
            .collect();
        let (status, body) = app.post("/api/v1/transactions", &json!(body)).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body, location) = post_job(
        &app,
        &json!({"from": "2025-01-01", "to": "2025-01-04"}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "QUEUED");
    let id = body["job_id"].as_i64().unwrap();
    assert_eq!(
        location.as_deref(),
        Some(format!("/api/v1/jobs/{id}").as_str())
    );
    wait_state(&app.pool, id, "completed").await;

    let expected = reference(&rows, day("2025-01-01"), day("2025-01-04"), Tz::UTC);
    let (status, content_type, text) = download(&app, &format!("/downloads/{id}.csv")).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/csv"), "{content_type}");
    assert_eq!(parse_csv(&text), expected);
    assert_eq!(
        settlements(&app.pool, day("2025-01-01"), day("2025-01-04")).await,
        expected
    );
    let (processed, total, result): (i64, Option<i64>, Value) =
        sqlx::query_as("select processed, total, result from all_jobs where id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(Some(processed), total);
    // The total counts what the job reads: the rows paid within its days, not the table.
    let within = support::paid_within(&rows, "2025-01-01", "2025-01-04", Tz::UTC);
    assert!(within < 2500);
    assert_eq!(total, Some(within));
    assert_eq!(result["download_url"], format!("/downloads/{id}.csv"));
    let (status, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["kind"], "settlement");
    assert_eq!(job["status"], "COMPLETED");
    assert_eq!(
        (job["progress"].as_i64(), job["processed"].as_i64()),
        (Some(100), Some(within))
    );
    assert_eq!(job["download_url"], format!("/downloads/{id}.csv"));
    assert_eq!(
        job["params"],
        json!({"from": "2025-01-01", "to": "2025-01-04"})
    );
}

#[tokio::test]
async fn bad_settlement_requests_are_rejected_and_enqueue_nothing() {
    let (app, _worker) = harness(&[("settlement.max_span_days", json!(31))]).await;
    let span = |from: &str, to: &str| json!({"from": from, "to": to});
    let cases = [
        (span("2025-02-30", "2025-03-01"), 422, "INVALID_DATE"),
        (span("2025-01-01", "01/31/2025"), 422, "INVALID_DATE"),
        // A year as chrono reads it but Postgres cannot hold: the job could only fail.
        (span("-5000-01-01", "-5000-01-02"), 422, "INVALID_DATE"),
        (span("2025-01-31", "2025-01-01"), 422, "INVALID_DATE_RANGE"),
        (span("2025-01-01", "2025-02-01"), 422, "INVALID_DATE_RANGE"),
        (json!({"from": "2025-01-01"}), 400, "INVALID_BODY"),
        (
            json!({"from": 20250101, "to": "2025-01-02"}),
            400,
            "INVALID_BODY",
        ),
        (
            json!({"from": "2025-01-01", "to": "2025-01-02", "zone": "UTC"}),
            400,
            "INVALID_BODY",
        ),
    ];
    for (body, status, code) in cases {
        let (got, error, _) = post_job(&app, &body, None).await;
        assert_eq!(got, status, "{body}: {error}");
        assert_error(&error, code);
    }
    let (got, error, _) = post_job(
        &app,
        &json!({"from": "2025-01-01", "to": "2025-01-02"}),
        Some(""),
    )
    .await;
    assert_eq!(got, 422, "{error}");
    assert_error(&error, "INVALID_IDEMPOTENCY_KEY");
    let jobs = support::scalar(&app.pool, "select count(*) from all_jobs").await;
    assert_eq!(jobs, 0);
}

#[tokio::test]
async fn an_idempotent_retry_returns_the_same_job() {
    let (app, _worker) = harness(&[]).await;
    let body = json!({"from": "2025-01-01", "to": "2025-01-02"});
    let (s1, b1, l1) = post_job(&app, &body, Some("settle-once")).await;
    let (s2, b2, l2) = post_job(&app, &body, Some("settle-once")).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(b1, b2);
    assert_eq!(l1, l2);
    let other = json!({"from": "2025-01-01", "to": "2025-01-03"});
    let (s3, error, _) = post_job(&app, &other, Some("settle-once")).await;
    assert_eq!(s3, 422);
    assert_error(&error, "IDEMPOTENCY_KEY_REUSED");
    let jobs = support::scalar(&app.pool, "select count(*) from all_jobs").await;
    assert_eq!(jobs, 1);
}

#[tokio::test]
async fn downloads_serve_only_completed_jobs() {
    let app = spawn_app_with(&[]).await; // no worker: the job stays queued
    let id = app.post_settlement("2025-01-01", "2025-01-02").await;
    // Even a file in the legacy results directory is not served before the job is COMPLETED.
    let dir = &app.config.settlement.results_dir;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{id}.csv")), "partial").unwrap();
    let (status, _, _) = download(&app, &format!("/downloads/{id}.csv")).await;
    assert_eq!(status, 404);
    for path in [
        "/downloads/999.csv",
        "/downloads/abc.csv",
        "/downloads/01.csv",
        "/downloads/-1.csv",
        "/downloads/1.txt",
        "/downloads/..%2F..%2Fetc%2Fpasswd",
        "/downloads/%2e%2e%2f1.csv",
        "/downloads/../Cargo.toml",
    ] {
        let (status, _, text) = download(&app, path).await;
        assert_eq!(status, 404, "{path}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_stops_it_and_writes_nothing() {
    let (app, _worker) = settling_app(5, 2).await;
    let days = (day("2025-01-01"), day("2025-01-03"));
    // Rows the cancel must keep, and new input that a run not stopped in time would fold in.
    let (before, _) = support::settled_then_more(&app, (31, 200), (12, 20_000), 5).await;
    // Running: a 5-row batch size makes the job long; cancel once it has made progress.
    let id = app.post_settlement("2025-01-01", "2025-01-03").await;
    wait_processed(&app.pool, id, 1, Duration::from_secs(12)).await;
    let mut conn = app.pool.acquire().await.unwrap();
    settle_workers::request_cancel(&mut conn, id).await.unwrap();
    wait_state(&app.pool, id, "cancelled").await;
    let (processed, total) = support::progress(&app.pool, id).await;
    assert!(
        total.is_some_and(|total| processed < total),
        "{processed} of {total:?}: it should have stopped early"
    );
    support::assert_left_nothing(&app.pool, id).await;
    assert_eq!(settlements(&app.pool, days.0, days.1).await, before);
    let (status, _, _) = download(&app, &format!("/downloads/{id}.csv")).await;
    assert_eq!(status, 404);
}

/// A merchant-day whose sum leaves 64 bits fails the job at once (retrying cannot help), with
/// the reason kept (in the queue and as `GET /api/v1/jobs/{id}` shows it), `settlements`
/// untouched and no working rows left, whichever part, or the finalize, finds it. The error
/// names the merchant-days whose sums do not fit, and which sums, so an operator can find the
/// rows: days of the job's zone, sums of rows that each fit, the first three of them and a
/// count of the rest. Rows of other days, and rows not PAID, are not the job's and are not
/// named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sum_past_64_bits_fails_the_job_for_good_naming_its_merchant_days() {
    let huge = i64::MAX / 2 + 1;
    // Settled in Tokyo, batches of two rows: "a"'s rows of 2025-01-01 fall on two UTC days.
    let in_tokyo = [
        ("a", huge, 0, Status::Paid, "2024-12-31T14:00"), // Tokyo's 2024-12-31
        ("a", huge, 0, Status::Paid, "2024-12-31T20:00"),
        ("a", 5, 1, Status::Paid, "2025-01-01T03:00"),
        ("a", huge, 0, Status::Paid, "2025-01-01T10:00"),
        ("b", huge, huge, Status::Paid, "2025-01-01T16:00"), // Tokyo's 2025-01-02
        ("b", huge, huge, Status::Paid, "2025-01-02T10:00"),
        ("c", huge, 0, Status::Paid, "2025-01-01T00:00"),
        ("c", huge, 0, Status::Paid, "2025-01-01T01:00"),
        ("c", huge, 0, Status::Paid, "2025-01-02T00:00"),
        ("c", huge, 0, Status::Paid, "2025-01-02T01:00"),
        ("d", i64::MAX, 0, Status::Paid, "2025-01-01T02:00"),
        ("d", huge, 0, Status::Failed, "2025-01-01T02:00"),
        ("d", huge, 0, Status::Refunded, "2025-01-01T02:00"),
        ("a", huge, 0, Status::Paid, "2025-01-02T16:00"), // Tokyo's 2025-01-03
        ("a", huge, 0, Status::Paid, "2025-01-02T20:00"),
    ];
    // Two parts of one batch each (ids 1-2 and 3-4), a row of 2^62 in each: each part's sums
    // fit, and only their merger in the finalize does not.
    let across_parts = [
        ("m", huge, 0, Status::Paid, "2025-01-01T10:00"),
        ("m", 5, 0, Status::Paid, "2025-01-01T11:00"),
        ("m", 6, 0, Status::Paid, "2025-01-01T12:00"),
        ("m", huge, 0, Status::Paid, "2025-01-01T13:00"),
    ];
    let cases: [(&str, i64, &[_], _, &str); 2] = [
        (
            "Asia/Tokyo",
            2,
            &in_tokyo,
            ("2025-01-01", "2025-01-02"),
            "a settlement sum exceeds the 64-bit range: merchant \"a\" on 2025-01-01 \
             (gross_cents, net_cents), merchant \"b\" on 2025-01-02 (gross_cents, fee_cents), \
             merchant \"c\" on 2025-01-01 (gross_cents, net_cents) and 1 more",
        ),
        (
            "UTC",
            100,
            &across_parts,
            ("2025-01-01", "2025-01-01"),
            "a settlement sum exceeds the 64-bit range: merchant \"m\" on 2025-01-01 \
             (gross_cents, net_cents)",
        ),
    ];
    for (zone, batch_size, rows, (from, to), expected) in cases {
        let (app, _worker) = harness(&[
            ("worker.batch_size", json!(batch_size)),
            ("settlement.parallel_parts", json!(2)),
            ("settlement.time_zone", json!(zone)),
        ])
        .await;
        // One at a time, so the ids follow the rows' order (a batch is stored in its own).
        for &(merchant, amount, fee, status, time) in rows {
            let paid_at = support::at(&format!("{time}:00Z"));
            let row = support::txn(merchant, amount, fee, status, paid_at);
            support::store(&app.pool, &[row]).await;
        }
        let id = app.post_settlement(from, to).await;
        wait_state(&app.pool, id, "failed").await;
        let (attempt, errors): (i32, Value) = job_row(&app.pool, id, "attempt, errors").await;
        assert_eq!(attempt, 1, "{errors}");
        assert_eq!(errors[0]["error"], expected, "{errors}");
        let (status, shown) = app.get(&format!("/api/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "{shown}");
        assert_eq!(shown["status"], "FAILED", "{shown}");
        assert_eq!(shown["error"], expected, "{shown}");
        assert_eq!(shown["errors"][0]["error"], expected, "{shown}");
        support::assert_left_nothing(&app.pool, id).await;
        let settled = settlements(&app.pool, day(from), day(to)).await;
        assert!(settled.is_empty(), "{settled:?}");
    }
}

#[tokio::test]
async fn a_cancelled_queued_job_never_starts() {
    let app = spawn_app_with(&[]).await;
    support::store_random(&app.pool, 13, 100, 2, 2).await;
    let id = app.post_settlement("2025-01-01", "2025-01-02").await;
    let mut conn = app.pool.acquire().await.unwrap();
    let outcome = settle_workers::request_cancel(&mut conn, id).await.unwrap();
    assert_eq!(
        outcome,
        settle_workers::CancelOutcome::Accepted(settle_workers::JobState::Cancelled)
    );
    let worker = start_worker(&app);
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await;
    let (state, _, started) = job_start(&app.pool, id).await;
    assert_eq!((state.as_str(), started), ("cancelled", None));
    let runs = support::scalar(&app.pool, "select count(*) from settlement_runs").await;
    assert_eq!(runs, 0);
    let settled = support::scalar(&app.pool, "select count(*) from settlements").await;
    assert_eq!(settled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_settlement_clears_the_working_rows_of_jobs_that_gave_up() {
    let (app, _worker) = harness(&[("worker.batch_size", json!(64))]).await;
    // A settlement that ran out of attempts mid-way: its run, part and batch rows remain.
    let dead = common::scalar(
        &app.pool,
        "insert into finished_jobs (kind, args, state, max_attempts, finished_at)
         values ('settlement', '{\"from\": \"2025-01-01\", \"to\": \"2025-01-02\"}', 'failed', 1, now())
         returning id",
    )
    .await;
    support::leave_working_rows(&app.pool, dead).await;
    let id = app.post_settlement("2025-01-01", "2025-01-02").await;
    wait_state(&app.pool, id, "completed").await;
    support::assert_no_working_rows(&app.pool, dead).await;
}

#[tokio::test]
async fn a_job_waiting_for_an_insert_in_flight_can_be_cancelled() {
    let (app, _worker) = harness(&[]).await;
    let rows = support::random_transactions(14, 3, 1, 1);
    support::store(&app.pool, &rows[1..]).await;
    // An insert left open (a stalled client, a bulk load): the job's input waits for it.
    let mut open = app.pool.begin().await.unwrap();
    support::insert(&mut open, &rows[..1]).await;
    let range = json!({"from": "2025-01-01", "to": "2025-01-01"});
    let (_, body, _) = post_job(&app, &range, None).await;
    let waiting = body["job_id"].as_i64().unwrap();
    wait_state(&app.pool, waiting, "running").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (state, total): (String, Option<i64>) =
        sqlx::query_as("select state::text, total from all_jobs where id = $1")
            .bind(waiting)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), total),
        ("running", None),
        "the input is not fixed while the insert is open"
    );
    let mut conn = app.pool.acquire().await.unwrap();
    settle_workers::request_cancel(&mut conn, waiting)
        .await
        .unwrap();
    wait_state(&app.pool, waiting, "cancelled").await;
    // Once the insert commits, the next job's input and result include its row.
    open.commit().await.unwrap();
    let (_, body, _) = post_job(&app, &range, None).await;
    let id = body["job_id"].as_i64().unwrap();
    wait_state(&app.pool, id, "completed").await;
    let total = common::scalar_of(&app.pool, "select total from all_jobs where id = $1", id).await;
    assert_eq!(
        total,
        support::paid_within(&rows, "2025-01-01", "2025-01-01", Tz::UTC)
    );
    assert_eq!(
        settlements(&app.pool, day("2025-01-01"), day("2025-01-01")).await,
        reference(&rows, day("2025-01-01"), day("2025-01-01"), Tz::UTC)
    );
}

/// Retention deletes a completed job (and, by its trigger, the job's rows) just after a download
/// found it: the CSV is still served whole, from the snapshot the job was found in. (Read
/// apart, the rows were gone: a 200 with the header alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_racing_retention_serves_the_whole_csv() {
    let (app, _worker) = settling_app(64, 2).await;
    let rows = support::store_random(&app.pool, 17, 600, 3, 2).await;
    let id = app.post_settlement("2025-01-01", "2025-01-02").await;
    wait_state(&app.pool, id, "completed").await;
    // The download's read of this job sleeps after taking its snapshot (this test's database
    // only: its view of the jobs is slowed for this id).
    for statement in [
        format!(
            "create function slow(job bigint) returns boolean language plpgsql as $$
             begin if job = {id} then perform pg_sleep(3); end if; return true; end $$"
        ),
        "create or replace view all_jobs as
         select * from jobs union all select * from finished_jobs where slow(id)"
            .to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&app.pool)
            .await
            .unwrap();
    }
    let download = tokio::spawn(
        app.http
            .get(app.url(&format!("/downloads/{id}.csv")))
            .send(),
    );
    common::processes::wait_for(Duration::from_secs(10), "the job's read", || async {
        let sleeping = common::scalar(
            &app.pool,
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event = 'PgSleep'",
        )
        .await;
        (sleeping > 0).then_some(())
    })
    .await;
    sqlx::query("delete from finished_jobs where id = $1")
        .bind(id)
        .execute(&app.pool)
        .await
        .unwrap();
    let response = download.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let expected = reference(&rows, day("2025-01-01"), day("2025-01-02"), Tz::UTC);
    assert_eq!(parse_csv(&response.text().await.unwrap()), expected);
}

/// A CSV read slowly: the server writes the last row into the sockets' buffers long before a
/// slow reader has drained them, and the transaction the download reads in then sits idle past
/// the sessions' idle-in-transaction timeout (300 ms here). The file still arrives whole.
#[tokio::test]
async fn a_csv_read_slowly_arrives_whole() {
    let db = common::engine::db("UTC", 1, 100).await;
    sqlx::query(
        "insert into settlement_results
             (job_id, merchant_id, date, gross_cents, fee_cents, net_cents, txn_count)
         select 7, 'merchant-' || n, date '2025-01-01', n, 0, n, 1
         from generate_series(1, 30000) as n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let options = (*db.pool.connect_options())
        .clone()
        .options([("idle_in_transaction_session_timeout", "300")]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    let mut rows = settle::settlement::results::stored_csv(
        pool.acquire().await.unwrap(),
        7,
        common::engine::READER_STALL,
    )
    .await
    .unwrap();
    use futures::TryStreamExt;
    let mut text = rows.try_next().await.unwrap().unwrap().to_vec();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    while let Some(chunk) = rows.try_next().await.unwrap() {
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(text).unwrap();
    assert_eq!(text.lines().count(), 30_001);
    assert_eq!(
        text.lines().last(),
        Some("merchant-9999,2025-01-01,9999,0,9999,1")
    );
}

/// A download whose reader stops taking bytes is cut off after `http.download_stall_timeout_ms`:
/// the snapshot it read in is let go (its COPY leaves the server, which otherwise waits on the
/// reader for ever, holding back vacuum), and the client sees the body fail, never a short file
/// that looks whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_is_cut_off_and_lets_go_of_its_snapshot() {
    let (app, id) = large_csv(&[("http.download_stall_timeout_ms", json!(500))]).await;
    let mut response = app
        .http
        .get(app.url(&format!("/downloads/{id}.csv")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut received = response.chunk().await.unwrap().unwrap().len();
    common::processes::wait_for(Duration::from_secs(20), "the COPY to go", || async {
        let copying = common::scalar(
            &app.pool,
            "select count(*) from pg_stat_activity
             where datname = current_database()
               and query like 'copy (select%from settlement_results%'",
        )
        .await;
        (copying == 0).then_some(())
    })
    .await;
    let ended = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(ended.is_err(), "ended cleanly after {received} bytes");
    assert!(received < 16_000_000, "{received} bytes");
}

/// An app (`overrides` over the test configuration) and a completed settlement job whose
/// stored CSV is far larger than the sockets' buffers (about 16 MB), so a reader that takes
/// nothing holds its download open; the worker that ran it is stopped.
async fn large_csv(overrides: &[(&str, Value)]) -> (TestApp, i64) {
    let (app, worker) = harness(overrides).await;
    support::store_random(&app.pool, 5, 50, 2, 1).await;
    let id = app.post_settlement("2025-01-01", "2025-01-01").await;
    wait_state(&app.pool, id, "completed").await;
    drop(worker);
    sqlx::query(
        "insert into settlement_results
             (job_id, merchant_id, date, gross_cents, fee_cents, net_cents, txn_count)
         select $1, 'padding-merchant-' || n, date '2025-01-02', n, 0, n, 1
         from generate_series(1, 400000) as n",
    )
    .bind(id)
    .execute(&app.pool)
    .await
    .unwrap();
    (app, id)
}

/// A reader that keeps taking bytes, slowly (here 256 KiB/s, with a stall timeout of 5 s), gets
/// the whole file. Before, the stall was measured as room in the download's few chunks ahead,
/// which the kernel gives back only once half of a socket buffer of megabytes has drained:
/// steady readers under about 30 KB/s were cut off mid-file at the default 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_reader_gets_the_whole_file() {
    let (app, id) = large_csv(&[("http.download_stall_timeout_ms", json!(5000))]).await;
    let url = app.url(&format!("/downloads/{id}.csv"));
    let mut response = app.http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let (started, mut received) = (std::time::Instant::now(), 0usize);
    let mut text = Vec::new();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => panic!("cut off after {received} bytes: {e}"),
        };
        received += chunk.len();
        text.extend_from_slice(&chunk);
        // The first 4 MiB at 256 KiB/s, the rest as fast as it comes.
        if received < 4 << 20 {
            let due = Duration::from_secs_f64(received as f64 / (256 << 10) as f64);
            tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
        }
    }
    let text = String::from_utf8(text).unwrap();
    let rows: i64 = sqlx::query_scalar("select count(*) from settlement_results where job_id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(text.lines().count() as i64, 1 + rows);
}

/// Downloads whose readers take nothing hold connections of their own, at most
/// `http.max_concurrent_downloads`; one more is answered 503, and orders and every other
/// request still get theirs. Before, each download held a connection of the API's one pool
/// until cut off as stalled, and a few unread downloads made every request answer 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_downloads_leave_the_other_requests_their_connections() {
    let (app, id) = large_csv(&[
        ("http.max_concurrent_downloads", json!(2)),
        ("database.max_connections", json!(6)),
        ("database.acquire_timeout_ms", json!(1000)),
    ])
    .await;
    let url = app.url(&format!("/downloads/{id}.csv"));
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..8 {
        let response = app.http.get(&url).send().await.unwrap();
        match response.status().as_u16() {
            200 => held.push(response),
            503 => refused += 1,
            other => panic!("download answered {other}"),
        }
    }
    assert_eq!((held.len(), refused), (2, 6));
    let product = app.product(5, 100).await;
    let (status, body) = app.get(&format!("/api/v1/products/{product}")).await;
    assert_eq!(status, 200, "{body}");
    drop(held);
}

/// Merchant ids a spreadsheet would run as formulas are written as text in the CSV (after an
/// apostrophe), in the order of the ids themselves; other ids, and the API's JSON, as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_spreadsheet_would_run_are_written_as_text_in_the_csv() {
    let (app, _worker) = settling_app(64, 3).await;
    let ids = [
        "=HYPERLINK(\"http://x/\",\"y\")",
        "@SUM(1+1)",
        "-2+3",
        "+1",
        "m-1",
    ];
    let body: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"merchant_id": id, "external_id": format!("ch_{i}"), "amount_cents": 1000,
                   "fee_cents": 30, "status": "PAID", "paid_at": "2025-05-02T12:00:00Z"})
        })
        .collect();
    let (status, body) = app.post("/api/v1/transactions", &json!(body)).await;
    assert_eq!(status, 201, "{body}");
    let range = json!({"from": "2025-05-02", "to": "2025-05-02"});
    let (status, body, _) = post_job(&app, &range, None).await;
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_i64().unwrap();
    wait_state(&app.pool, id, "completed").await;
    let (_, _, text) = download(&app, &format!("/downloads/{id}.csv")).await;
    // Each row the same day and sums; its first field as written (CSV-quoted where it holds
    // a quote or a comma), in the bytewise order of the stored ids: + - = @ m.
    let firsts: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|line| line.strip_suffix(",2025-05-02,1000,30,970,1").expect(line))
        .collect();
    assert_eq!(
        firsts,
        [
            "'+1",
            "'-2+3",
            r#""'=HYPERLINK(""http://x/"",""y"")""#,
            "'@SUM(1+1)",
            "m-1"
        ]
    );
    let (_, page) = app
        .get("/api/v1/settlements?from=2025-05-02&to=2025-05-02")
        .await;
    let listed: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["merchant_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        [
            "+1",
            "-2+3",
            "=HYPERLINK(\"http://x/\",\"y\")",
            "@SUM(1+1)",
            "m-1"
        ]
    );
}
