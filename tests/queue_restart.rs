//! A Postgres restart under a running `settle worker`, on a private cluster the test starts
//! itself (so the shared server of the other tests is not disturbed): the worker process stays
//! up, reconnects every connection (pool, heartbeat, LISTEN), and every job still completes
//! exactly — the counting job's count is exact and each small job's effect row lands once. An
//! outage longer than the lease costs no attempt either: the leases it let run out are taken
//! again at the same attempt, so a job on its last attempt completes instead of failing.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::cluster::Cluster;
use common::processes::{
    self, WorkerProcess, counted, enqueue, enqueue_count, job_row, job_state, probe_pool,
    processed, reported_count, short_lease, wait_for,
};
use common::{migrated_pool, test_config};
use serde_json::{Value, json};
use settle::jobs::kind::{COUNT, NOOP, SLEEP};
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

/// A server down for more than a lease lets every held lease run out: the worker, which could
/// renew none of them, drops its jobs, and the server comes back with them RUNNING under leases
/// that expired. Those leases ran out because the server restarted after their last heartbeat,
/// not because a worker was lost: they are taken again at the same attempt with no error
/// recorded, so jobs on their one and only attempt complete (exactly, for the counting one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_lease_spends_no_attempt() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let mut settings = short_lease(2000, 500);
    settings.push(("database.url", json!(cluster.url("settle_restart"))));
    let config = test_config(&settings);
    let (pool, _db) = probe_pool(&config).await;
    // Both on their last attempt: ~4 s of checkpointed batches, and 4 s of sleep.
    let count = enqueue(
        &pool,
        COUNT,
        json!({"upto": 400, "batch": 10, "sleep_ms": 100}),
        1,
    )
    .await;
    let sleep = enqueue(&pool, SLEEP, json!({"ms": 4000}), 1).await;
    let mut worker = WorkerProcess::start(&config);
    wait_processed(&pool, count, 50).await;
    assert_eq!(job_state(&pool, sleep).await, "running");

    // Two and a half leases without a server.
    cluster.stop().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.start_again().await;

    for id in [count, sleep] {
        let (state, attempt, errors): (String, i32, Value) =
            wait_for(DEADLINE, "the job ended", || async {
                let row: (String, i32, Value) =
                    job_row(&pool, id, "state::text, attempt, errors").await;
                ["completed", "failed", "cancelled"]
                    .contains(&row.0.as_str())
                    .then_some(row)
            })
            .await;
        assert_eq!(
            (state.as_str(), attempt, &errors),
            ("completed", 1, &json!([])),
            "job {id}: {}",
            worker.log_text()
        );
    }
    assert_eq!(
        counted(&pool, count).await,
        (400, 40),
        "exact after the outage"
    );
    assert_eq!(reported_count(&pool, count).await, Some(400));
    // The outage did outlast the lease: the worker gave its jobs up, and took them again.
    assert!(
        worker.log_text().contains("no heartbeat for a whole lease"),
        "{}",
        worker.log_text()
    );
    assert!(worker.terminate().await, "{}", worker.log_text());
}

/// The rule as the claim and the liveness probe apply it: a lease whose last heartbeat the
/// server's restart came after is taken again at the same attempt with no error recorded,
/// whether it ran out (the claim's rescue) or its owner's lock went with the server (the probe);
/// a lease taken after the restart is a lost worker's, its attempt spent.
#[tokio::test]
async fn leases_held_across_a_restart_are_taken_again_at_the_same_attempt() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let config = test_config(&[("database.url", json!(cluster.url("settle_restart")))]);
    let (pool, _db) = migrated_pool(&config).await;
    // A kind per pair, so that claiming the second pair cannot rescue the first.
    let before = held_by_the_dead(&pool, SLEEP, "before+lock").await;
    cluster.restart().await;
    let after = held_by_the_dead(&pool, NOOP, "after+lock").await;

    let mut conn = pool.acquire().await.unwrap();
    let dead = ["before+lock".to_owned(), "after+lock".to_owned()];
    let found = settle_workers::liveness::probe(&mut conn, "prober", &dead)
        .await
        .unwrap();
    assert_eq!(found.requeued, 2, "{found:?}");
    let kinds = [SLEEP.to_owned(), NOOP.to_owned()];
    let lease = Duration::from_secs(60);
    let claimed = settle_workers::claim::claim(&mut conn, "next", 4, lease, &kinds, &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    for id in before {
        let (attempt, errors): (i32, Value) = job_row(&pool, id, "attempt, errors").await;
        assert_eq!((attempt, &errors), (1, &json!([])), "job {id}");
    }
    for id in after {
        let (attempt, errors): (i32, Value) = job_row(&pool, id, "attempt, errors").await;
        assert_eq!(attempt, 2, "job {id}: {errors}");
        assert_eq!(
            errors.as_array().map(Vec::len),
            Some(1),
            "job {id}: {errors}"
        );
        assert!(
            errors[0]["error"]
                .as_str()
                .unwrap()
                .starts_with("worker lost"),
            "{errors}"
        );
    }
}

/// Two jobs of `kind` (two attempts each) claimed by `owner`, which holds no liveness lock and
/// never beats: the first under a lease of a minute, the second under one that has run out.
async fn held_by_the_dead(pool: &PgPool, kind: &str, owner: &str) -> [i64; 2] {
    let mut conn = pool.acquire().await.unwrap();
    let kinds = [kind.to_owned()];
    let mut held = [0; 2];
    for (job, lease) in held.iter_mut().zip([60_000, 1]) {
        enqueue(pool, kind, json!({"ms": 600_000}), 2).await;
        let lease = Duration::from_millis(lease);
        let claimed = settle_workers::claim::claim(&mut conn, owner, 1, lease, &kinds, &[])
            .await
            .unwrap();
        *job = claimed[0].id;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    held
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
