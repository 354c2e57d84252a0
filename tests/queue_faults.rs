//! Faults around real `settle worker` processes: SIGKILL, SIGSTOP past the lease, SIGTERM,
//! and every connection of the worker terminated by Postgres. Each time the counting job's
//! result is exact: no batch counted twice, none skipped.

mod common;

use std::time::{Duration, Instant};

use common::commit_cut::{Cut, CutProxy};
use common::processes::{
    self, WorkerProcess, counted, enqueue, enqueue_count, job_row, job_state, probe_pool,
    processed, reported_count, short_lease, wait_for, wait_state,
};
use common::proxy::Proxy;
use common::test_config;
use nix::sys::signal::Signal;
use serde_json::json;
use settle::jobs::kind::{COUNT, NOOP, SLEEP};
use sqlx::{Connection, PgPool};

/// Waits until the job has committed at least `at_least` rows of progress.
async fn wait_processed(pool: &PgPool, id: i64, at_least: i64) -> i64 {
    processes::wait_processed(pool, id, at_least, Duration::from_secs(60)).await
}

/// Terminates the sessions of the worker's pool named `application`; how many there were.
async fn terminate_sessions(pool: &PgPool, application: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and application_name = $1) t",
    )
    .bind(application)
    .fetch_one(pool)
    .await
    .expect("terminated")
}

/// (attempt, fence, lease_owner) of a job.
async fn claim_of(pool: &PgPool, id: i64) -> (i32, i64, Option<String>) {
    job_row(pool, id, "attempt, fence, lease_owner").await
}

/// (fence, state, processed) of a job: what a stale holder's write would change.
async fn fenced_row(pool: &PgPool, id: i64) -> (i64, String, i64) {
    job_row(pool, id, "fence, state::text, processed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_job_resumes_from_its_checkpoint_on_another_worker_within_15_s() {
    // Default lease and heartbeat: the bound is a promise of the default config.
    let config = test_config(&[]);
    let (pool, _db) = probe_pool(&config).await;
    let id = enqueue_count(&pool, 400, 10, 100).await;
    let first = WorkerProcess::start(&config);
    let at_kill = wait_processed(&pool, id, 50).await;
    first.kill().await;
    let killed_at = Instant::now();
    let _second = WorkerProcess::start(&config);
    wait_for(Duration::from_secs(60), "the job reclaimed", || async {
        let (attempt, _, _) = claim_of(&pool, id).await;
        (attempt == 2).then_some(())
    })
    .await;
    let resumed_after = killed_at.elapsed();
    assert!(
        resumed_after < Duration::from_secs(15),
        "resumed after {resumed_after:?}"
    );
    wait_state(&pool, id, "completed").await;
    // Exact: a batch redone (started from zero) would count more, a batch skipped less.
    assert_eq!(counted(&pool, id).await, (400, 40), "killed at {at_kill}");
    assert_eq!(reported_count(&pool, id).await, Some(400));
    assert!(at_kill >= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_past_its_lease_writes_nothing_and_drops_the_job() {
    let config = test_config(&short_lease(2000, 500));
    let (pool, _db) = probe_pool(&config).await;
    let id = enqueue_count(&pool, 100, 5, 200).await;
    let mut paused = WorkerProcess::start(&config);
    wait_processed(&pool, id, 10).await;
    paused.signal(Signal::SIGSTOP);
    let _other = WorkerProcess::start(&config);
    wait_state(&pool, id, "completed").await;
    let before = fenced_row(&pool, id).await;
    assert_eq!(counted(&pool, id).await, (100, 20));

    paused.signal(Signal::SIGCONT);
    // Give the resumed worker several heartbeats and batches' worth of time to try to write.
    wait_for(
        Duration::from_secs(60),
        "the paused worker to drop the job",
        || async { paused.log_text().contains("lease lost").then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fenced_row(&pool, id).await, before);
    assert_eq!(counted(&pool, id).await, (100, 20));
    assert!(
        paused.is_running(),
        "the paused worker survives: {}",
        paused.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_without_spending_the_attempt() {
    let config = test_config(&[]);
    let (pool, _db) = probe_pool(&config).await;
    let id = enqueue_count(&pool, 300, 10, 100).await;
    let mut first = WorkerProcess::start(&config);
    wait_processed(&pool, id, 30).await;
    let (_, _, first_owner) = claim_of(&pool, id).await;
    let _second = WorkerProcess::start(&config);
    assert!(
        first.terminate().await,
        "graceful exit: {}",
        first.log_text()
    );
    let released_at = Instant::now();
    let owner = wait_for(
        Duration::from_secs(60),
        "another worker to take the job",
        || async {
            match claim_of(&pool, id).await {
                (1, 2, Some(owner)) => Some(owner),
                _ => None,
            }
        },
    )
    .await;
    assert_ne!(Some(owner), first_owner);
    // Picked up at once thanks to the release and its NOTIFY, not at lease expiry (10 s).
    assert!(
        released_at.elapsed() < Duration::from_secs(8),
        "{:?}",
        released_at.elapsed()
    );
    wait_state(&pool, id, "completed").await;
    assert_eq!(counted(&pool, id).await, (300, 30));
    let (attempt, _, _) = claim_of(&pool, id).await;
    assert_eq!(attempt, 1, "a shutdown spends no attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_are_reopened_and_the_job_finishes_exactly() {
    let config = test_config(&[]);
    let (pool, _db) = probe_pool(&config).await;
    let id = enqueue_count(&pool, 300, 10, 100).await;
    let noops: Vec<i64> = {
        let mut ids = Vec::new();
        for _ in 0..200 {
            ids.push(enqueue(&pool, NOOP, json!({"record": true}), 5).await);
        }
        ids
    };
    let mut worker = WorkerProcess::start(&config);
    let mut conn = sqlx::PgConnection::connect_with(
        &settle::db::connect_options(&config.database.url).unwrap(),
    )
    .await
    .unwrap();
    for at in [50, 150] {
        wait_processed(&pool, id, at).await;
        let killed: i64 = sqlx::query_scalar(
            "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity
             where datname = current_database() and pid <> pg_backend_pid()) t",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(killed > 0);
    }
    wait_state(&pool, id, "completed").await;
    assert_eq!(counted(&pool, id).await, (300, 30));
    assert_eq!(reported_count(&pool, id).await, Some(300));
    assert_eq!(processed(&pool, id).await, 300);
    for noop in noops {
        wait_state(&pool, noop, "completed").await;
    }
    let effects = common::scalar(&pool, "select count(*) from queue_probe_effects").await;
    assert_eq!(effects, 200);
    assert!(worker.is_running(), "{}", worker.log_text());
    // Every connection was replaced, not just lost.
    let (attempt, _, _) = claim_of(&pool, id).await;
    assert_eq!(
        attempt,
        1,
        "transient errors spend no attempt: {}",
        worker.log_text()
    );
}

/// The next claim that takes a job sleeps `seconds` in its update, once.
async fn pause_next_claim(pool: &PgPool, seconds: f64) {
    common::pause_once(
        pool,
        "before update on jobs for each row
         when (old.state = 'queued' and new.state = 'running')",
        seconds,
    )
    .await;
}

/// A worker on `config` whose first `cuts` claims lose their connection once the server has
/// their Bind (the claim's text is parsed in a round trip of its own; the next chunk with a
/// statement name after the unnamed portal's empty one is the Bind that runs it).
async fn worker_whose_claims_are_cut(
    config: &settle::config::Config,
    cuts: usize,
) -> (CutProxy, WorkerProcess) {
    let proxy = CutProxy::start(
        common::server_address().parse().unwrap(),
        b"with expired as",
        b"\0sqlx_s_",
        Cut::AfterForwarding,
        cuts,
    )
    .await;
    let database = config.database.url.rsplit('/').next().unwrap();
    let via_proxy = format!("postgres://postgres@{}/{database}", proxy.addr);
    let worker = WorkerProcess::start_with(config, &[("SETTLE_DATABASE__URL", via_proxy)]);
    (proxy, worker)
}

/// A claim whose reply is lost with its connection has committed, or commits later: its job is
/// RUNNING under a worker that never heard of it. The worker hands it back and runs it on the
/// same attempt, rather than leaving it to its lease (9 s here) and a rescue that, with one
/// attempt allowed, would fail it without running it.
async fn a_claim_cut_off(claim_still_running: bool) {
    let mut settings = short_lease(9_000, 2_000);
    // One slot: one claim at a time, so the first claim (the one cut) takes the job.
    settings.push(("worker.concurrency", json!(1)));
    let config = test_config(&settings);
    let (pool, _db) = probe_pool(&config).await;
    let id = enqueue(&pool, NOOP, json!({}), 1).await;
    if claim_still_running {
        // The first claim sleeps 2 s in its update: it is still running when its connection
        // goes, and commits after the worker has seen the claim fail.
        pause_next_claim(&pool, 2.0).await;
    }
    let (proxy, worker) = worker_whose_claims_are_cut(&config, 1).await;
    wait_for(Duration::from_secs(20), "the job to complete", || async {
        (job_state(&pool, id).await == "completed").then_some(())
    })
    .await;
    assert_eq!(proxy.cuts_made(1), 1, "{}", worker.log_text());
    let (attempt, _, _) = claim_of(&pool, id).await;
    assert_eq!(attempt, 1, "{}", worker.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_claim_reply_was_lost_runs_at_once_on_its_attempt() {
    a_claim_cut_off(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_after_its_claim_was_cut_off_runs_on_its_attempt() {
    a_claim_cut_off(true).await;
}

/// Claims cut off, the last still running when SIGTERM comes: the worker's last sweep waits for
/// the claim that failed last (not the first) to have ended, and hands its job back, QUEUED on
/// its attempt, instead of leaving it RUNNING under a worker that is gone (with one attempt
/// allowed, a rescue would then fail it without running it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_sweep_at_shutdown_waits_for_the_claim_that_failed_last() {
    // Claims are cut off by the server at 5 s (a third of the lease); no poll between them.
    let mut settings = short_lease(15_000, 2_000);
    settings.push(("worker.poll_interval_ms", json!(60_000)));
    settings.push(("worker.concurrency", json!(1)));
    let config = test_config(&settings);
    let (pool, _db) = probe_pool(&config).await;
    // The first claim of each of the worker's two lanes is cut, with nothing to take.
    let (proxy, mut worker) = worker_whose_claims_are_cut(&config, 3).await;
    wait_for(Duration::from_secs(10), "the first claims cut", || async {
        (proxy.cuts_made(3) == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The next claim takes the job, then sleeps 4.5 s in its update: it commits well after
    // the first claims ended, and after the worker saw it fail.
    pause_next_claim(&pool, 4.5).await;
    let id = enqueue(&pool, NOOP, json!({}), 1).await;
    wait_for(Duration::from_secs(10), "the job's claim cut", || async {
        (proxy.cuts_made(3) == 3).then_some(())
    })
    .await;
    let committed = tokio::time::Instant::now() + Duration::from_secs(5);
    assert!(worker.terminate().await, "{}", worker.log_text());
    tokio::time::sleep_until(committed).await;
    // Claimed once (the fence moved), and handed back.
    let job: (String, i32, i64) = job_row(&pool, id, "state::text, attempt, fence").await;
    assert_eq!(job, ("queued".to_owned(), 0, 1), "{}", worker.log_text());
}

/// One held job's row locked by another transaction for two leases (as a job's own long write
/// would lock it): the heartbeat does not wait for that row, so the worker's other job keeps its
/// lease; once the lock goes, the locked job's lease is extended again. Both finish on their
/// one attempt. (Waiting for the lock, every beat failed, and after a lease the worker dropped
/// every job it held.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_row_lock_on_one_job_holds_up_no_lease() {
    let mut settings = short_lease(3_000, 500);
    settings.push(("worker.concurrency", json!(2)));
    let config = test_config(&settings);
    let (pool, _db) = probe_pool(&config).await;
    let locked = enqueue(&pool, SLEEP, json!({"ms": 9_000}), 1).await;
    let other = enqueue(&pool, SLEEP, json!({"ms": 9_000}), 1).await;
    let worker = WorkerProcess::start(&config);
    for id in [locked, other] {
        wait_state(&pool, id, "running").await;
    }
    // Locked for one statement's length (an idle transaction would meet the sessions' timeout).
    let held = "with row as (select id from jobs where id = $1 for update)
                select count(pg_sleep(6)) from row";
    assert_eq!(common::scalar_of(&pool, held, locked).await, 1);
    for id in [locked, other] {
        wait_state(&pool, id, "completed").await;
        assert_eq!(claim_of(&pool, id).await.0, 1, "{}", worker.log_text());
    }
}

/// A heartbeat cut off for longer than a lease while the job's own checkpoints keep committing
/// (each extends the lease as a beat would): the job is not given up. Given up, its lease ran
/// out a lease after its last checkpoint and it was taken again as a lost worker's, its only
/// attempt spent: "lease expired on the last attempt (worker lost)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_keep_a_job_whose_heartbeat_is_cut_off() {
    let config = test_config(&short_lease(2000, 500));
    let (pool, _db) = probe_pool(&config).await;
    // ~6 s of checkpointed batches, on its only attempt.
    let args = json!({"upto": 600, "batch": 10, "sleep_ms": 100});
    let id = enqueue(&pool, COUNT, args, 1).await;
    let proxy = Proxy::start(&common::server_address()).await;
    let database = config.database.url.rsplit('/').next().unwrap();
    let worker =
        WorkerProcess::start_with(&config, &[("SETTLE_DATABASE__URL", proxy.url(database))]);
    wait_processed(&pool, id, 50).await;
    // The job's connection stays; the heartbeat's is cut, and the next takes 3 s to open: each
    // beat gives up after 1 s, until the liveness probe (which waits up to 5 s) has opened it.
    // The outage must end before the job does: its completion is recorded on those connections.
    proxy.delay_later_connections(Duration::from_secs(3));
    assert!(terminate_sessions(&pool, "settle control").await > 0);
    let ended = wait_for(Duration::from_secs(60), "the job ended", || async {
        let row: (String, i32, serde_json::Value) =
            job_row(&pool, id, "state::text, attempt, errors").await;
        (row.0 != "running").then_some(row)
    })
    .await;
    assert_eq!(
        ended,
        ("completed".to_owned(), 1, json!([])),
        "{}",
        worker.log_text()
    );
    assert_eq!(counted(&pool, id).await, (600, 60));
    // The heartbeat was cut off: the code before dropped the job after the second failed beat
    // (none for 2.9 s, past the 2 s lease).
    assert!(
        worker.log_text().matches("heartbeat failed").count() >= 2,
        "{}",
        worker.log_text()
    );
}

/// A claim whose connection took longer than a lease to open gives its jobs their lease from
/// the moment the claim was sent, not from when it asked for a connection: the failed beat
/// right after it does not drop the job it has just claimed. (CI saw it as the server came
/// back: a claim that waited 2.3 s for its connection, a 2 s lease, the next beat failed, and
/// the job was dropped, its lease ran out, and it failed as a lost worker's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_on_a_slow_connection_survives_a_failed_heartbeat() {
    let config = test_config(&short_lease(3000, 500));
    let (pool, _db) = probe_pool(&config).await;
    let proxy = Proxy::start(&common::server_address()).await;
    let database = config.database.url.rsplit('/').next().unwrap();
    let worker =
        WorkerProcess::start_with(&config, &[("SETTLE_DATABASE__URL", proxy.url(database))]);
    wait_for(Duration::from_secs(30), "the worker's claims", || async {
        let claims = common::scalar(
            &pool,
            "select count(*) from pg_stat_activity
             where datname = current_database() and application_name = 'settle claims'",
        );
        (claims.await > 0).then_some(())
    })
    .await;

    // The claims' next connection takes 4 s to open, more than the 3 s lease.
    proxy.delay_application("settle claims", Duration::from_secs(4));
    assert!(terminate_sessions(&pool, "settle claims").await > 0);
    let asked = Instant::now();
    let id = enqueue(&pool, SLEEP, json!({"ms": 3000}), 1).await;
    wait_state(&pool, id, "running").await;
    let claimed = asked.elapsed();
    // Once claimed (before its first beat, 500 ms on), the heartbeat's connections are cut and
    // their next takes 1.5 s to open: the beats, which give up after 1 s, fail until it is
    // lifted, once one has. (Cut before the claim, the worker could not claim at all while
    // its control connection stayed out of reach, and the test waited for ever.)
    proxy.delay_application("settle control", Duration::from_millis(1500));
    assert!(terminate_sessions(&pool, "settle control").await > 0);
    wait_for(Duration::from_secs(20), "a failed heartbeat", || async {
        worker.log_text().contains("heartbeat failed").then_some(())
    })
    .await;
    proxy.delay_application("settle control", Duration::ZERO);

    let ended = wait_for(Duration::from_secs(60), "the job ended", || async {
        let row: (String, i32, serde_json::Value) =
            job_row(&pool, id, "state::text, attempt, errors").await;
        (row.0 != "running").then_some(row)
    })
    .await;
    let log = worker.log_text();
    assert_eq!(ended, ("completed".to_owned(), 1, json!([])), "{log}");
    // What made the code before drop the job: a claim that waited out a lease, then a failed
    // beat.
    assert!(
        claimed > Duration::from_secs(3),
        "claimed after {claimed:?}"
    );
}
