//! The vacuumer and autovacuum, on a private cluster (the shared test server runs with
//! autovacuum off, and its settings are not the tests' to change): a throttled autovacuum of
//! `jobs`, vacuuming or analyzing it, does not hold the worker's own vacuum off.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::processes::{WorkerProcess, eager_vacuum, wait_for, wait_for_jobs_vacuum};
use common::{migrated_pool, test_config};
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::NewJob;

/// Autovacuum visits every second and, at a cost limit of 1 with a 100 ms delay, crawls through
/// the dead rows of 50,000 deleted jobs for minutes. A worker whose threshold they pass queues
/// its own vacuum behind it; Postgres cancels the autovacuum once `deadlock_timeout` (1 s)
/// has passed, and the worker's vacuum runs. Without the takeover the worker would skip while
/// the autovacuum ran, and no manual vacuum would come within the wait below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_over_from_a_throttled_autovacuum_of_the_jobs_table() {
    takes_over_from(
        "autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0",
        "pg_stat_progress_vacuum",
    )
    .await;
}

/// The same with autovacuum analyzing `jobs` (vacuums turned off for the table): an analyze
/// holds the lock a vacuum needs, and autovacuum's crawls as its vacuums do (sampling the
/// table's pages of 50,000 dead rows, one 100 ms delay per page, for over a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_over_from_a_throttled_autoanalyze_of_the_jobs_table() {
    takes_over_from(
        "autovacuum_vacuum_threshold = 2000000000, autovacuum_vacuum_insert_threshold = -1,
         autovacuum_analyze_threshold = 0, autovacuum_analyze_scale_factor = 0",
        "pg_stat_progress_analyze",
    )
    .await;
}

/// Leaves 50,000 dead jobs for a crawling autovacuum (started by the table's `thresholds`,
/// throttled), waits until it works on `jobs` (as `progress`, a `pg_stat_progress_*` view,
/// shows), then starts a worker that vacuums past 1,000 dead rows: its vacuum must come within
/// 30 s, and the server must have cancelled the autovacuum for it.
async fn takes_over_from(thresholds: &str, progress: &str) {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let config = test_config(&[("database.url", json!(cluster.url("settle_autovacuum")))]);
    let (pool, _db) = migrated_pool(&config).await;
    let jobs = vec![NewJob::new(NOOP, json!({})); 50_000];
    settle_workers::enqueue_many(&mut pool.acquire().await.unwrap(), &jobs)
        .await
        .unwrap();
    for statement in [
        "alter system set autovacuum_naptime = 1".to_owned(),
        "select pg_reload_conf()".to_owned(),
        format!(
            "alter table jobs set ({thresholds}, autovacuum_vacuum_cost_delay = 100,
                 autovacuum_vacuum_cost_limit = 1)"
        ),
        "delete from jobs".to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    let working = format!(
        "select count(*) from {progress} p join pg_stat_activity a on a.pid = p.pid
         where p.datname = current_database() and p.relid = 'jobs'::regclass
           and a.backend_type = 'autovacuum worker'"
    );
    wait_for(
        Duration::from_secs(60),
        "autovacuum at work on jobs",
        || async { (common::scalar(&pool, &working).await > 0).then_some(()) },
    )
    .await;

    let mut worker = WorkerProcess::start_with(&config, &eager_vacuum());
    wait_for_jobs_vacuum(&pool, Duration::from_secs(30)).await;
    assert!(
        cluster.server_log().contains("canceling autovacuum task"),
        "{}",
        cluster.server_log()
    );
    assert!(worker.terminate().await, "{}", worker.log_text());
}
