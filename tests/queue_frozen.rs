//! A worker frozen in the middle of a transaction (SIGSTOP while its session is idle in a
//! transaction holding the job's row locks) does not keep the job from being finished: Postgres
//! ends the frozen transaction after `idle_in_transaction_session_timeout` (below the lease),
//! another worker reclaims the job when the lease expires and finishes it exactly, and the
//! frozen worker, once resumed, writes nothing. A frozen worker's cancelling job ends CANCELLED
//! the same way, with no lost attempt recorded.

mod common;

use std::time::Duration;

use common::processes::{
    WorkerProcess, counted, enqueue, job_row, probe_pool, reported_count, short_lease, wait_for,
    wait_state,
};
use common::{migrated_pool, test_config};
use nix::sys::signal::Signal;
use serde_json::json;
use settle::jobs::kind::{COUNT, SLEEP};
use settle_workers::{CancelOutcome, JobState, request_cancel};
use sqlx::PgPool;

/// True while some session of this database is idle in a transaction (the frozen batch).
async fn idle_in_transaction(pool: &PgPool) -> bool {
    sqlx::query_scalar(
        "select exists (select 1 from pg_stat_activity
                        where datname = current_database() and state = 'idle in transaction')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_inside_a_transaction_does_not_pin_its_job() {
    // The default lease and grace, a faster heartbeat and poll.
    let config = test_config(&short_lease(10_000, 1000));
    let (pool, _db) = probe_pool(&config).await;
    // Each batch holds its transaction open for 1.5 s after writing the job's count row.
    let args = json!({"upto": 40, "batch": 5, "hold_ms": 1500});
    let id = enqueue(&pool, COUNT, args, 5).await;
    let mut frozen = WorkerProcess::start(&config);
    wait_for(Duration::from_secs(60), "a batch in progress", || async {
        let (rows, _) = counted(&pool, id).await;
        (rows >= 5 && idle_in_transaction(&pool).await).then_some(())
    })
    .await;
    frozen.signal(Signal::SIGSTOP);
    let before = counted(&pool, id).await;

    // Another worker takes the job once the lease expires; without the session timeout its
    // first batch would wait forever on the count row the frozen transaction holds.
    let _rescuer = WorkerProcess::start(&config);
    wait_state(&pool, id, "completed").await;
    assert_eq!(counted(&pool, id).await, (40, 8), "exact after the rescue");
    assert_eq!(reported_count(&pool, id).await, Some(40));
    // The frozen worker's session lives on: its lease ran out, and the rescue recorded the
    // attempt it spent.
    let (errors,): (serde_json::Value,) = job_row(&pool, id, "errors").await;
    assert_eq!(errors.as_array().map(Vec::len), Some(1), "{errors}");
    assert_eq!(errors[0]["attempt"], 1, "{errors}");
    assert_eq!(errors[0]["error"], "worker lost (its lease expired)");
    assert!(
        !idle_in_transaction(&pool).await,
        "the frozen transaction was ended"
    );
    assert!(
        before.0 < 40,
        "the job was really mid-way when frozen: {before:?}"
    );

    frozen.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        counted(&pool, id).await,
        (40, 8),
        "the resumed worker wrote nothing"
    );
    assert!(
        frozen.is_running(),
        "the frozen worker survives: {}",
        frozen.log_text()
    );
}

/// A frozen worker's job whose cancel was asked for (CANCELLING) is taken at lease expiry by
/// another worker's claim and ends CANCELLED at the attempt it was on: a cancelled job failed
/// nothing, so no attempt is counted (and none recorded in `errors`) for the lost worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_workers_cancelling_job_ends_cancelled_with_no_lost_attempt() {
    let config = test_config(&short_lease(5000, 500));
    let (pool, _db) = probe_pool(&config).await;
    let id = enqueue(&pool, SLEEP, json!({"ms": 600_000}), 5).await;
    let frozen = WorkerProcess::start(&config);
    wait_state(&pool, id, "running").await;
    frozen.signal(Signal::SIGSTOP);
    let mut conn = pool.acquire().await.unwrap();
    let outcome = request_cancel(&mut conn, id).await.unwrap();
    assert_eq!(outcome, CancelOutcome::Accepted(JobState::Cancelling));

    // The frozen worker's liveness lock lives on, so only the lease's expiry frees the job.
    // The rescuer's probe never runs within the test, so its claim is what ends the job.
    let _rescuer = WorkerProcess::start_with(
        &config,
        &[
            ("SETTLE_WORKER__RESCUE_PROBE_MS", "600000".into()),
            ("SETTLE_WORKER__RESCUE_GRACE_MS", "1200000".into()),
        ],
    );
    wait_state(&pool, id, "cancelled").await;
    let ended: (i32, i64, serde_json::Value) = job_row(&pool, id, "attempt, fence, errors").await;
    // Fence 2: taken by the rescuer's claim; the attempt as it was, nothing recorded lost.
    assert_eq!(ended, (1, 2, json!([])));
    frozen.signal(Signal::SIGCONT);
}

#[tokio::test]
async fn sessions_end_frozen_transactions_before_the_lease_expires() {
    for (lease_ms, expected) in [(10_000, "5s"), (2000, "1s")] {
        let config = test_config(&[
            ("worker.lease_ms", json!(lease_ms)),
            ("worker.heartbeat_ms", json!(500)),
            ("worker.shutdown_grace_ms", json!(lease_ms / 2)),
        ]);
        let (pool, _db) = migrated_pool(&config).await;
        let setting: String = sqlx::query_scalar("show idle_in_transaction_session_timeout")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(setting, expected, "lease {lease_ms} ms");
    }
}
