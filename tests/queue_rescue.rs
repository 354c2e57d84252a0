//! Rescue through liveness locks, with real `settle worker` processes, real signals and a real
//! `pg_terminate_backend`: a SIGKILLed worker's job is taken by a waiting worker while its
//! lease still has most of its two minutes to run (only the freed lock can explain that), a
//! live worker's jobs are never taken by the workers probing beside it, and a worker whose
//! lock session is ended locks again and keeps its job. Each time the count is exact.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::processes::{
    WorkerProcess, counted, enqueue, enqueue_count, job_row, probe_pool, reported_count, wait_for,
    wait_processed, wait_state,
};
use common::{TestDatabase, test_config};
use serde_json::{Value, json};
use settle::config::Config;
use settle::jobs::kind::SLEEP;
use settle_workers::liveness::LOCK_CLASS;
use sqlx::PgPool;

/// Generous: the machine running this may be small and busy.
const DEADLINE: Duration = Duration::from_secs(60);

/// A queue database, and the settings its workers start with: the defaults but a two-minute
/// lease, longer than any wait here, so a job that changes hands in these tests does so through
/// the liveness lock, never at lease expiry.
async fn long_lease_queue() -> (Config, PgPool, TestDatabase) {
    let config = test_config(&[("worker.lease_ms", json!(120_000))]);
    let (pool, database) = probe_pool(&config).await;
    (config, pool, database)
}

/// (attempt, fence, lease_owner, lease_expires_at, heartbeat_at) of a job.
type Claim = (
    i32,
    i64,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

async fn claim_of(pool: &PgPool, id: i64) -> Claim {
    sqlx::query_as(
        "select attempt, fence, lease_owner, lease_expires_at, heartbeat_at from all_jobs
         where id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The backend holding `owner`'s liveness lock in this database, if any.
async fn lock_session(pool: &PgPool, owner: &str) -> Option<i32> {
    sqlx::query_scalar(
        "select pid from pg_locks
         where locktype = 'advisory' and granted and objsubid = 2 and classid = $1::int4::oid
           and objid = hashtext($2)::oid
           and database = (select oid from pg_database where datname = current_database())",
    )
    .bind(LOCK_CLASS)
    .bind(owner)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Liveness locks held in this database: one per running worker.
async fn locks_held(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_locks
         where locktype = 'advisory' and granted and objsubid = 2 and classid = $1::int4::oid
           and database = (select oid from pg_database where datname = current_database())",
    )
    .bind(LOCK_CLASS)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_job_is_taken_by_a_waiting_worker_long_before_its_lease_ends() {
    let (config, pool, _db) = long_lease_queue().await;
    let mut workers = vec![WorkerProcess::start(&config), WorkerProcess::start(&config)];
    let id = enqueue_count(&pool, 400, 10, 100).await;
    let at_kill = wait_processed(&pool, id, 50, DEADLINE).await;
    let (_, _, owner, lease_until, _) = claim_of(&pool, id).await;
    let (owner, lease_until) = (owner.expect("held"), lease_until.expect("held"));
    let holder = workers
        .iter()
        .position(|w| owner.starts_with(&format!("{}-", w.pid)))
        .expect("one of the test's workers holds the job");
    workers.remove(holder).kill().await;

    wait_for(DEADLINE, "the job taken over", || async {
        (claim_of(&pool, id).await.0 == 2).then_some(())
    })
    .await;
    let (_, fence, new_owner, _, claimed_at) = claim_of(&pool, id).await;
    // The claim (or a heartbeat since) stamped this: still inside the killed worker's lease.
    let claimed_at = claimed_at.expect("held");
    assert!(
        claimed_at < lease_until,
        "taken at {claimed_at}, the lease ran to {lease_until}"
    );
    assert_eq!(fence, 2);
    assert_ne!(new_owner.as_deref(), Some(owner.as_str()));
    wait_state(&pool, id, "completed").await;
    // Exact: a batch redone would count more, a batch skipped less.
    assert_eq!(counted(&pool, id).await, (400, 40), "killed at {at_kill}");
    assert_eq!(reported_count(&pool, id).await, Some(400));
    assert!(workers[0].is_running(), "{}", workers[0].log_text());
    // The attempt the killed worker spent is in the job's errors.
    let (errors,): (Value,) = job_row(&pool, id, "errors").await;
    assert_eq!(errors.as_array().map(Vec::len), Some(1), "{errors}");
    assert_eq!(errors[0]["attempt"], 1, "{errors}");
    assert_eq!(errors[0]["error"], "worker lost (its session ended)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_workers_long_jobs_are_never_taken_by_the_workers_probing_beside_it() {
    let (config, pool, _db) = long_lease_queue().await;
    let mut live = WorkerProcess::start(&config);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(enqueue_count(&pool, 100, 5, 300).await);
    }
    for &id in &ids {
        wait_processed(&pool, id, 5, DEADLINE).await;
    }
    // Two more workers, probing every 200 ms while the live one's jobs run for seconds.
    let probers = [WorkerProcess::start(&config), WorkerProcess::start(&config)];
    wait_for(DEADLINE, "three liveness locks", || async {
        (locks_held(&pool).await == 3).then_some(())
    })
    .await;
    for &id in &ids {
        wait_state(&pool, id, "completed").await;
    }
    for &id in &ids {
        let (attempt, fence, ..) = claim_of(&pool, id).await;
        assert_eq!((attempt, fence), (1, 1), "job {id}: {}", live.log_text());
        assert_eq!(counted(&pool, id).await, (100, 20));
    }
    assert!(live.is_running(), "{}", live.log_text());
    for prober in &probers {
        assert!(
            !prober.log_text().contains("leases expired"),
            "{}",
            prober.log_text()
        );
    }
}

/// A body that commits its checkpoints back to back holds its own row locked nearly all the
/// time, so the heartbeat (which skips locked rows) finds it busy beat after beat: its
/// checkpoints extend the lease themselves, and a live job's lease never runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_checkpointing_back_to_back_never_sees_its_lease_run_out() {
    let config = test_config(&[
        ("worker.lease_ms", json!(2_000)),
        ("worker.heartbeat_ms", json!(500)),
        ("worker.shutdown_grace_ms", json!(1_000)),
    ]);
    let (pool, _db) = probe_pool(&config).await;
    // Each batch's commit takes 300 ms at its end (a deferred trigger), the job's row locked
    // by its checkpoint meanwhile.
    sqlx::raw_sql(
        "create function slow_commit() returns trigger language plpgsql as
             $$ begin perform pg_sleep(0.3); return null; end $$;
         create constraint trigger slow_commit after insert or update on queue_probe_counts
             deferrable initially deferred for each row execute function slow_commit();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut worker = WorkerProcess::start(&config);
    let id = enqueue_count(&pool, 40, 1, 0).await;
    wait_processed(&pool, id, 1, DEADLINE).await;
    // Eight seconds, four leases: every look finds the lease ahead.
    for _ in 0..80 {
        let (attempt, fence, ..) = claim_of(&pool, id).await;
        let expired = "select (lease_expires_at < now())::int::int8 from all_jobs where id = $1";
        let expired = common::scalar_of(&pool, expired, id).await;
        assert!(
            expired == 0 && (attempt, fence) == (1, 1),
            "{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker.terminate().await, "{}", worker.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lock_session_is_terminated_locks_again_and_keeps_its_job() {
    let (config, pool, _db) = long_lease_queue().await;
    let mut worker = WorkerProcess::start(&config);
    let id = enqueue_count(&pool, 400, 10, 100).await;
    wait_processed(&pool, id, 50, DEADLINE).await;
    let waiting = WorkerProcess::start(&config);
    let (_, _, owner, ..) = claim_of(&pool, id).await;
    let owner = owner.expect("held");
    for at in [100, 200] {
        wait_processed(&pool, id, at, DEADLINE).await;
        let session = lock_session(&pool, &owner).await.expect("the lock is held");
        let ended: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
            .bind(session)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(ended);
        wait_for(DEADLINE, "the lock taken again", || async {
            lock_session(&pool, &owner)
                .await
                .filter(|&pid| pid != session)
        })
        .await;
    }
    wait_state(&pool, id, "completed").await;
    let (attempt, fence, ..) = claim_of(&pool, id).await;
    assert_eq!(
        (attempt, fence),
        (1, 1),
        "the job stayed with its worker: {}",
        waiting.log_text()
    );
    assert_eq!(counted(&pool, id).await, (400, 40));
    assert_eq!(reported_count(&pool, id).await, Some(400));
    assert!(worker.is_running(), "{}", worker.log_text());
}

/// A job whose worker is killed on its last attempt fails as that attempt, saying why: the
/// rescue's claim counts one more, which no attempt ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_dies_on_its_last_attempt_fails_as_that_attempt() {
    let (config, pool, _db) = long_lease_queue().await;
    let id = enqueue(&pool, SLEEP, json!({"ms": 600_000}), 1).await;
    let first = WorkerProcess::start(&config);
    wait_state(&pool, id, "running").await;
    first.kill().await;
    let _second = WorkerProcess::start(&config);
    wait_state(&pool, id, "failed").await;
    let (attempt, max_attempts, errors): (i32, i32, Value) =
        job_row(&pool, id, "attempt, max_attempts, errors").await;
    assert_eq!((attempt, max_attempts), (1, 1));
    assert_eq!(errors.as_array().unwrap().len(), 1, "{errors}");
    assert_eq!(errors[0]["attempt"], 1, "{errors}");
    assert_eq!(
        errors[0]["error"],
        "lease expired on the last attempt (worker lost)"
    );
}
