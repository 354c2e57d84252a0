//! Throughput correctness: two real worker processes drain many jobs, each exactly once.

mod common;

use std::time::Duration;

use common::processes::{WorkerProcess, probe_tables, wait_for};
use common::{migrated_pool, test_config};
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::NewJob;

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
    wait_for(
        Duration::from_secs(120),
        "all 10,000 jobs completed",
        || async {
            let done = common::scalar(
                &pool,
                "select count(*) from all_jobs where state = 'completed'",
            )
            .await;
            (done == 10_000).then_some(())
        },
    )
    .await;

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
/// by Postgres as a manual vacuum: autovacuum's runs count apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_vacuums_the_jobs_table_its_drain_left_dead_rows_in() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    let vacuums = "select vacuum_count from pg_stat_user_tables where relname = 'jobs'";
    assert_eq!(common::scalar(&pool, vacuums).await, 0);
    let jobs = vec![NewJob::new(NOOP, json!({})); 2_000];
    let mut conn = pool.acquire().await.unwrap();
    settle_workers::enqueue_many(&mut conn, &jobs)
        .await
        .unwrap();

    let mut worker = WorkerProcess::start_with(
        &config,
        &[
            ("SETTLE_WORKER__VACUUM_DEAD_ROWS", "1000".into()),
            ("SETTLE_WORKER__VACUUM_INTERVAL_MS", "100".into()),
        ],
    );
    wait_for(Duration::from_secs(60), "a vacuum of jobs", || async {
        (common::scalar(&pool, vacuums).await > 0).then_some(())
    })
    .await;
    let left = common::scalar(&pool, "select count(*) from jobs").await;
    let finished = common::scalar(&pool, "select count(*) from finished_jobs").await;
    assert_eq!(left + finished, 2_000);
    assert!(worker.terminate().await, "{}", worker.log_text());
}
