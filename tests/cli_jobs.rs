//! `settle jobs list|show|cancel|retry`: the real binary on the database, as an operator runs
//! it: a table for the list, the API's JSON for one job, clear errors and a non-zero exit for
//! an unknown id or a job in the wrong state.

mod common;

use common::ops::{settle_cli, settle_cli_with};
use common::processes::{enqueue, job_in_state, job_state};
use common::{TestApp, spawn_app};
use serde_json::{Value, json};
use settle::jobs::kind::{NOOP, SLEEP};

/// A noop job that failed with `error`.
async fn failed_job(app: &TestApp, error: &str) -> i64 {
    let id = job_in_state(&app.pool, "failed").await;
    sqlx::query(
        "update finished_jobs set errors = jsonb_build_array(jsonb_build_object(
             'attempt', 1, 'error', $2::text, 'at', now()))
         where id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(&app.pool)
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn list_shows_a_table_filtered_by_status_and_kind() {
    let app = spawn_app().await;
    let queued = enqueue(&app.pool, NOOP, json!({}), 3).await;
    let failed = failed_job(&app, "the bank said no").await;
    let other = enqueue(&app.pool, SLEEP, json!({"ms": 1}), 3).await;

    let (ok, out, err) = settle_cli(&app, &["jobs", "list"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("STATUS"),
        "{out}"
    );
    let ids: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        ids,
        [other, failed, queued].map(|id| id.to_string()),
        "newest first: {out}"
    );
    assert!(
        lines[2].contains("FAILED") && lines[2].contains("the bank said no"),
        "{out}"
    );

    let (ok, out, _) = settle_cli(&app, &["jobs", "list", "--status", "FAILED"]);
    assert!(
        ok && out.lines().count() == 2 && out.contains(&failed.to_string()),
        "{out}"
    );
    let (ok, out, _) = settle_cli(&app, &["jobs", "list", "--kind", SLEEP, "--limit", "5"]);
    assert!(
        ok && out.lines().count() == 2 && out.contains(SLEEP),
        "{out}"
    );
    let (ok, _, err) = settle_cli(&app, &["jobs", "list", "--status", "sleeping"]);
    assert!(!ok && err.contains("--status"), "{err}");
    let (ok, _, err) = settle_cli(&app, &["jobs", "list", "--limit", "0"]);
    assert!(!ok && err.contains("--limit"), "{err}");
    let (ok, out, err) = settle_cli(&app, &["jobs", "list", "--kind", ""]);
    assert!(
        !ok && err.contains("--kind must not be empty"),
        "{err}{out}"
    );
}

/// Without --limit the list is one page of `pagination.default_page_size` (config.toml says
/// so), as the API's lists are; --limit is still held to `pagination.max_page_size`.
#[tokio::test]
async fn list_pages_by_the_configured_page_sizes() {
    let app = spawn_app().await;
    for _ in 0..25 {
        enqueue(&app.pool, NOOP, json!({}), 3).await;
    }
    let rows = |out: &str| out.lines().count() - 1;

    // The shipped default, 50: all 25.
    let (ok, out, err) = settle_cli(&app, &["jobs", "list"]);
    assert!(ok && rows(&out) == 25, "{err}{out}");
    let (ok, out, err) = settle_cli_with(
        &app,
        &[("SETTLE_PAGINATION__DEFAULT_PAGE_SIZE", "3")],
        &["jobs", "list"],
    );
    assert!(ok && rows(&out) == 3, "{err}{out}");
    let small = [
        ("SETTLE_PAGINATION__MAX_PAGE_SIZE", "10"),
        ("SETTLE_PAGINATION__DEFAULT_PAGE_SIZE", "10"),
    ];
    let (ok, out, err) = settle_cli_with(&app, &small, &["jobs", "list"]);
    assert!(ok && rows(&out) == 10, "{err}{out}");
    let (ok, _, err) = settle_cli_with(&app, &small, &["jobs", "list", "--limit", "11"]);
    assert!(
        !ok && err.contains("--limit must be between 1 and 10"),
        "{err}"
    );

    // Past the newest page: --before the last ID shown lists the ones older than it.
    let ids = |out: &str| -> Vec<i64> {
        let cells = out.lines().skip(1).map(|l| l.split_whitespace().next());
        cells.map(|id| id.unwrap().parse().unwrap()).collect()
    };
    let (_, first, _) = settle_cli(&app, &["jobs", "list", "--limit", "20"]);
    let last = ids(&first)[19].to_string();
    let (ok, rest, err) = settle_cli(&app, &["jobs", "list", "--before", &last]);
    assert!(ok, "{err}");
    let (first, rest) = (ids(&first), ids(&rest));
    assert_eq!(rest.len(), 5, "{rest:?}");
    let mut all = [first, rest].concat();
    all.dedup();
    assert_eq!(all.len(), 25, "every job once, newest first: {all:?}");
    assert!(all.is_sorted_by(|a, b| a > b), "{all:?}");
}

#[tokio::test]
async fn show_prints_the_jobs_api_json() {
    let app = spawn_app().await;
    let id = failed_job(&app, "timeout").await;
    let (ok, out, err) = settle_cli(&app, &["jobs", "show", &id.to_string()]);
    assert!(ok, "{err}");
    let shown: Value = serde_json::from_str(&out).expect("JSON");
    let (_, api) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(shown, api);
    assert_eq!(shown["errors"][0]["error"], "timeout");

    let (ok, out, err) = settle_cli(&app, &["jobs", "show", "424242"]);
    assert!(
        !ok && out.is_empty() && err.contains("no job 424242"),
        "{err}"
    );
}

#[tokio::test]
async fn cancel_and_retry_change_the_job_or_say_why_not() {
    let app = spawn_app().await;
    let failed = failed_job(&app, "boom").await;
    let queued = enqueue(&app.pool, NOOP, json!({}), 3).await;

    let (ok, out, err) = settle_cli(&app, &["jobs", "retry", &failed.to_string()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("job {failed}: QUEUED"));
    assert_eq!(job_state(&app.pool, failed).await, "queued");
    let (ok, _, err) = settle_cli(&app, &["jobs", "retry", &failed.to_string()]);
    assert!(
        !ok && err.contains("is QUEUED") && err.contains("FAILED or CANCELLED"),
        "{err}"
    );

    let (ok, out, err) = settle_cli(&app, &["jobs", "cancel", &queued.to_string()]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("job {queued}: CANCELLED"));
    assert_eq!(job_state(&app.pool, queued).await, "cancelled");
    let (ok, _, _) = settle_cli(&app, &["jobs", "retry", &queued.to_string()]);
    assert!(ok, "a cancelled job can be retried");

    for command in ["cancel", "retry"] {
        let (ok, _, err) = settle_cli(&app, &["jobs", command, "424242"]);
        assert!(!ok && err.contains("no job 424242"), "{command}: {err}");
    }
}

/// `settle jobs list | head` with the reader gone before the table is written: the command
/// ends quietly and succeeds, with no error logged for a reader that wanted no more.
#[tokio::test]
async fn a_reader_that_closed_the_output_is_no_error() {
    let app = spawn_app().await;
    enqueue(&app.pool, NOOP, json!({}), 3).await;
    let mut child = common::settle_command()
        .args(["jobs", "list"])
        .env("SETTLE_DATABASE__URL", &app.config.database.url)
        .env("SETTLE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run settle");
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    assert!(said.is_empty(), "{said}");
}
