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
