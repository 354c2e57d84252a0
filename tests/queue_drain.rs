//! Draining: real worker processes drain many jobs, each exactly once; the jobs table stays
//! compact; a worker whose completions cannot land stops claiming.

mod common;

use std::time::Duration;

use common::processes::{
    WorkerProcess, eager_vacuum, jobs_vacuums, probe_tables, wait_for, wait_for_jobs_vacuum,
};
use common::{migrated_pool, test_config};
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::NewJob;
use sqlx::{PgPool, Postgres, Transaction};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_drain_ten_thousand_jobs_each_exactly_once() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    probe_tables(&pool).await;
    let jobs: Vec<NewJob> = (0..10_000)
        .map(|_| NewJob::new(NOOP, json!({"record": true})))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    for chunk in jobs.chunks(2_000) {
        settle_workers::enqueue_many(&mut tx, chunk).await.unwrap();
    }
    tx.commit().await.unwrap();

    let workers = [WorkerProcess::start(&config), WorkerProcess::start(&config)];
    all_completed(&pool, 10_000, Duration::from_secs(120)).await;

    // One effect row per job (the primary key would have refused a second), each written by
    // the transaction that completed the job on its first attempt.
    let (effects, distinct, reruns): (i64, i64, i64) = sqlx::query_as(
        "select count(*), count(distinct job_id), count(*) filter (where attempt <> 1)
         from queue_probe_effects",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((effects, distinct, reruns), (10_000, 10_000, 0));
    let owners = common::scalar(
        &pool,
        "select count(*) from all_jobs
         where state <> 'completed' or attempt <> 1 or lease_owner is not null",
    )
    .await;
    assert_eq!(owners, 0);
    // Each ending moved its job out of the queue's table: `jobs` holds only live jobs.
    let queue = common::scalar(&pool, "select count(*) from jobs").await;
    let finished = common::scalar(&pool, "select count(*) from finished_jobs").await;
    assert_eq!((queue, finished), (0, 10_000));
    for mut worker in workers {
        assert!(worker.terminate().await, "{}", worker.log_text());
    }
}

/// A worker vacuums the jobs table once its dead rows pass `worker.vacuum_dead_rows` (counted
/// by Postgres as a manual vacuum: autovacuum's runs count apart). While another session holds
/// the table (as autovacuum or another worker's vacuum does) the worker skips its vacuum without
/// a word in its log (Postgres warns of every skip), and vacuums once the table is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_vacuums_the_jobs_table_its_drain_left_dead_rows_in() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    assert_eq!(jobs_vacuums(&pool).await, 0);
    // The lock a VACUUM takes: claims and endings go on, the worker's vacuum is skipped.
    let blocker = noops_behind(
        &pool,
        2_000,
        "lock table jobs in share update exclusive mode",
    )
    .await;

    let mut worker = WorkerProcess::start_with(&config, &eager_vacuum());
    let dead = "select n_dead_tup from pg_stat_user_tables where relname = 'jobs'";
    wait_for(Duration::from_secs(60), "dead rows past 1,000", || async {
        (common::scalar(&pool, dead).await >= 1_000).then_some(())
    })
    .await;
    // Five of the worker's checks find the dead rows and the table taken.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(jobs_vacuums(&pool).await, 0);
    assert!(
        !worker.log_text().contains("skipping vacuum"),
        "{}",
        worker.log_text()
    );

    blocker.rollback().await.unwrap();
    wait_for_jobs_vacuum(&pool, Duration::from_secs(60)).await;
    let left = common::scalar(&pool, "select count(*) from jobs").await;
    let finished = common::scalar(&pool, "select count(*) from finished_jobs").await;
    assert_eq!(left + finished, 2_000);
    assert!(worker.terminate().await, "{}", worker.log_text());
}

/// A drain that ends below `worker.vacuum_dead_rows` is vacuumed all the same once no live job
/// is left: a tenth of the threshold is enough then (an idle worker's claims would otherwise
/// walk every dead entry its drain left at the claimable index's oldest end, to find nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_queue_is_vacuumed_below_the_threshold() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    let jobs = vec![NewJob::new(NOOP, json!({})); 3_000];
    settle_workers::enqueue_many(&mut pool.acquire().await.unwrap(), &jobs)
        .await
        .unwrap();
    // 3,000 jobs leave 6,000 dead rows: under the threshold, over a tenth of it.
    let env = [
        ("SETTLE_WORKER__VACUUM_DEAD_ROWS", "50000".to_owned()),
        ("SETTLE_WORKER__VACUUM_INTERVAL_MS", "100".to_owned()),
    ];
    let mut worker = WorkerProcess::start_with(&config, &env);
    wait_for_jobs_vacuum(&pool, Duration::from_secs(60)).await;
    let finished = common::scalar(&pool, "select count(*) from finished_jobs").await;
    assert_eq!(finished, 3_000);
    assert!(worker.terminate().await, "{}", worker.log_text());
}

/// The completion batcher's queue is bounded: while its statement cannot land (a test session
/// holds `finished_jobs` in SHARE mode, which every completion's insert waits for), a worker of
/// `concurrency` slots holds at most twice that many jobs (a batch waiting on the lock, and one
/// job per slot waiting for a place in the next) instead of claiming the whole queue; once the
/// lock goes, every job completes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_completions_cannot_land_stops_claiming() {
    const SLOTS: i64 = 4;
    let config = test_config(&[
        ("worker.concurrency", json!(SLOTS)),
        ("worker.poll_interval_ms", json!(100)),
    ]);
    let (pool, _db) = migrated_pool(&config).await;
    let blocker = noops_behind(&pool, 200, "lock table finished_jobs in share mode").await;

    let mut worker = WorkerProcess::start(&config);
    let held = "select count(*) from jobs where state = 'running'";
    wait_for(
        Duration::from_secs(30),
        "the slots and places full",
        || async { (common::scalar(&pool, held).await >= 2 * SLOTS).then_some(()) },
    )
    .await;
    // A worker whose batcher queued without bound would go on claiming (every job here takes
    // no time) until the queue was empty.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(common::scalar(&pool, held).await, 2 * SLOTS);
    }

    blocker.rollback().await.unwrap();
    all_completed(&pool, 200, Duration::from_secs(60)).await;
    assert_eq!(common::scalar(&pool, "select count(*) from jobs").await, 0);
    assert!(worker.terminate().await, "{}", worker.log_text());
}

/// Waits until `jobs` jobs have completed.
async fn all_completed(pool: &PgPool, jobs: i64, timeout: Duration) {
    let completed = "select count(*) from all_jobs where state = 'completed'";
    wait_for(timeout, &format!("all {jobs} jobs completed"), || async {
        (common::scalar(pool, completed).await == jobs).then_some(())
    })
    .await;
}

/// Queues `jobs` no-op jobs, then opens a transaction that takes `lock` (a `lock table`
/// statement) and holds it until the caller ends it.
async fn noops_behind(pool: &PgPool, jobs: usize, lock: &str) -> Transaction<'static, Postgres> {
    let queued = vec![NewJob::new(NOOP, json!({})); jobs];
    settle_workers::enqueue_many(&mut pool.acquire().await.unwrap(), &queued)
        .await
        .unwrap();
    common::held_open(pool, &[lock]).await
}
