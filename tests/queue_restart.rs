//! A Postgres restart under a running `settle worker`, on a private cluster the test starts
//! itself (so the shared server of the other tests is not disturbed): the worker process stays
//! up, reconnects every connection (pool, heartbeat, LISTEN), and every job still completes
//! exactly — the counting job's count is exact and each small job's effect row lands once.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::cluster::Cluster;
use common::processes::{
    self, WorkerProcess, counted, enqueue_count, probe_pool, processed, reported_count, wait_for,
};
use common::test_config;
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::NewJob;
use sqlx::PgPool;

/// Generous: the machine running this may be small and busy.
const DEADLINE: Duration = Duration::from_secs(90);

/// Waits until the job has committed at least `at_least` rows of progress.
async fn wait_processed(pool: &PgPool, id: i64, at_least: i64) -> i64 {
    processes::wait_processed(pool, id, at_least, DEADLINE).await
}

/// Enqueues `n` recording no-ops in one transaction, the i-th due `i * step` from now.
async fn enqueue_spread(pool: &PgPool, n: usize, step: Duration) -> Vec<i64> {
    let now = Utc::now();
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob {
            run_at: Some(now + step * i as u32),
            ..NewJob::new(NOOP, json!({"record": true}))
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let ids = settle_workers::enqueue_many(&mut tx, &jobs).await.unwrap();
    tx.commit().await.unwrap();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_job_is_survived_and_every_job_completes_exactly() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let config = test_config(&[
        ("database.url", json!(cluster.url("settle_restart"))),
        // Far longer than either outage below, so no lease may expire: every job must finish
        // on its first claim, and one left stuck by the restart shows as a second attempt
        // (a rescue) instead of being quietly re-run.
        ("worker.lease_ms", json!(30_000)),
    ]);
    let (pool, _db) = probe_pool(&config).await;
    // ≥ 12 s of checkpointed batches: still running after both restarts.
    let count = enqueue_count(&pool, 1200, 10, 100).await;
    let mut worker = WorkerProcess::start(&config);
    wait_processed(&pool, count, 100).await;
    // Small jobs falling due one by one across both restarts: some run before, some fall due
    // while the server is down, the rest after.
    let mut small = enqueue_spread(&pool, 400, Duration::from_millis(25)).await;

    // A restart: sessions terminated (57P01), the server back within a second or so.
    cluster.restart().await;
    let after_first = processed(&pool, count).await;
    wait_processed(&pool, count, after_first + 100).await;

    // A longer outage: connections refused for seconds, then a fresh server.
    cluster.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start_again().await;
    let back_at: DateTime<Utc> = sqlx::query_scalar("select now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    wait_heartbeat_after(&pool, count, back_at).await;
    wait_listening(&pool).await;
    // Jobs enqueued after the outage are claimed too.
    small.extend(enqueue_spread(&pool, 100, Duration::ZERO).await);
    wait_completed(&pool, small.len() as i64 + 1).await;

    // Exact: a batch counted twice (a resume from an older checkpoint) would count more, a
    // batch skipped less.
    assert_eq!(counted(&pool, count).await, (1200, 120));
    assert_eq!(reported_count(&pool, count).await, Some(1200));
    assert_eq!(processed(&pool, count).await, 1200);
    assert_each_ran_once(&pool, &small).await;
    assert_nothing_rescued_or_failed(&pool, &worker).await;
    assert!(worker.is_running(), "{}", worker.log_text());
    assert!(
        worker.terminate().await,
        "the worker exits cleanly after the restarts: {}",
        worker.log_text()
    );
}

/// Waits until the held job's lease was extended after `back_at`: the heartbeat recovered.
async fn wait_heartbeat_after(pool: &PgPool, id: i64, back_at: DateTime<Utc>) {
    wait_for(DEADLINE, "a heartbeat after the restart", || async {
        let (state, beat): (String, Option<DateTime<Utc>>) =
            sqlx::query_as("select state::text, heartbeat_at from all_jobs where id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(
            state, "running",
            "the job ended before a heartbeat was seen"
        );
        beat.is_some_and(|beat| beat > back_at).then_some(())
    })
    .await;
}

/// Waits until LISTEN was re-established (its session's last statement is the LISTEN).
async fn wait_listening(pool: &PgPool) {
    wait_for(DEADLINE, "the worker to LISTEN again", || async {
        let listening = common::scalar(
            pool,
            "select count(*) from pg_stat_activity
             where datname = current_database() and query like 'LISTEN \"settle_jobs\"%'",
        )
        .await;
        (listening >= 1).then_some(())
    })
    .await;
}

/// Waits until `total` jobs are COMPLETED.
async fn wait_completed(pool: &PgPool, total: i64) {
    wait_for(DEADLINE, "every job completed", || async {
        let done = common::scalar(
            pool,
            "select count(*) from all_jobs where state = 'completed'",
        )
        .await;
        (done == total).then_some(())
    })
    .await;
}

/// One effect row per small job (the primary key refuses a second), from its first attempt.
async fn assert_each_ran_once(pool: &PgPool, small: &[i64]) {
    let (effects, ours, reruns): (i64, i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where job_id = any($1)),
                count(*) filter (where attempt <> 1)
         from queue_probe_effects",
    )
    .bind(small)
    .fetch_one(pool)
    .await
    .unwrap();
    let n = small.len() as i64;
    assert_eq!((effects, ours, reruns), (n, n, 0));
}

/// Nothing was rescued or failed: transient errors spend no attempt and record no error.
async fn assert_nothing_rescued_or_failed(pool: &PgPool, worker: &WorkerProcess) {
    let odd: Vec<(i64, i32, serde_json::Value)> = sqlx::query_as(
        "select id, attempt, errors from all_jobs
         where attempt <> 1 or fence <> 1 or errors <> '[]' or lease_owner is not null",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(odd.is_empty(), "{odd:?}\n{}", worker.log_text());
}
