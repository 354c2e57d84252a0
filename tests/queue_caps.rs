//! Per-kind caps (`[worker.kinds.<kind>] concurrency = N`), with real worker processes: a
//! worker never runs more than N jobs of a capped kind at once, whatever its concurrency, while
//! other kinds take its remaining slots; each worker process holds its own cap; and a capped
//! job that ends frees its place for the next one.
//!
//! What ran when is read from Postgres afterwards, for every instant rather than sampled: each
//! job here runs once, so its `[started_at, finished_at)` (the claim's and the ending's
//! statement times) is when the database showed it running, and a trigger records which worker
//! each claim was for (`lease_owner` is cleared when a job ends).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::processes::{WorkerProcess, job_row, probe_pool, short_lease, wait_for};
use common::test_config;
use serde_json::{Value, json};
use settle::jobs::kind::{COUNT, SLEEP};
use settle_workers::NewJob;
use sqlx::PgPool;

/// The capped kind's cap in every test, and the workers' concurrency: well above it.
const CAP: i64 = 2;
const CONCURRENCY: i64 = 8;

fn capped_config(poll_interval_ms: u64) -> settle::config::Config {
    capped(vec![("worker.poll_interval_ms", json!(poll_interval_ms))])
}

/// The test config with `settings`, the workers' concurrency and the capped kind's cap.
fn capped(mut settings: Vec<(&'static str, Value)>) -> settle::config::Config {
    settings.extend([
        ("worker.concurrency", json!(CONCURRENCY)),
        ("worker.kinds.sleep.concurrency", json!(CAP)),
    ]);
    test_config(&settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_kind_runs_at_most_its_cap_while_other_kinds_fill_the_slots() {
    let config = capped_config(1000);
    let (pool, _db) = probe_pool(&config).await;
    record_claims(&pool).await;
    // The capped jobs come first in the queue, so every claim meets them before the others.
    let mut jobs = vec![NewJob::new(SLEEP, json!({"ms": 200})); 10];
    let long_count = json!({"upto": 30, "batch": 1, "sleep_ms": 100});
    jobs.extend(vec![NewJob::new(COUNT, long_count); 6]);
    enqueue_all(&pool, &jobs).await;

    let mut worker = WorkerProcess::start(&config);
    wait_all_completed(&pool, jobs.len()).await;
    let instants = running_instants(&pool).await;
    let most_capped = instants.iter().map(|i| i.capped).max();
    assert_eq!(most_capped, Some(CAP), "{instants:#?}");
    // The slots the cap keeps from the capped kind went to the other kind, at the same time.
    assert!(
        instants
            .iter()
            .any(|i| i.capped == CAP && i.running == CONCURRENCY),
        "{instants:#?}"
    );
    assert!(worker.terminate().await, "{}", worker.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_process_holds_its_own_cap() {
    let config = capped_config(1000);
    let (pool, _db) = probe_pool(&config).await;
    record_claims(&pool).await;
    let mut workers = [WorkerProcess::start(&config), WorkerProcess::start(&config)];
    for worker in &workers {
        wait_started(worker).await;
    }
    let jobs = vec![NewJob::new(SLEEP, json!({"ms": 300})); 16];
    enqueue_all(&pool, &jobs).await;

    wait_all_completed(&pool, jobs.len()).await;
    let instants = running_instants(&pool).await;
    let mut most: HashMap<&str, i64> = HashMap::new();
    for instant in &instants {
        let seen = most.entry(instant.owner.as_str()).or_default();
        *seen = (*seen).max(instant.capped);
    }
    assert_eq!(most.len(), 2, "both workers ran jobs: {instants:#?}");
    assert!(most.values().all(|&n| n == CAP), "{most:?} {instants:#?}");
    // Together they ran twice the cap at once: the cap is each worker's, not a shared one.
    assert_eq!(most_at_once(&pool).await, 2 * CAP);
    for worker in &mut workers {
        assert!(worker.terminate().await, "{}", worker.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_job_that_ends_frees_its_place() {
    // No poll within the test's wait: after the first claim fills the cap, only the places
    // freed by ending jobs can bring the next ones in.
    let config = capped_config(600_000);
    let (pool, _db) = probe_pool(&config).await;
    let mut worker = WorkerProcess::start(&config);
    wait_started(&worker).await;
    let jobs = vec![NewJob::new(SLEEP, json!({"ms": 50})); 10];
    enqueue_all(&pool, &jobs).await;
    wait_all_completed(&pool, jobs.len()).await;
    assert!(worker.terminate().await, "{}", worker.log_text());
}

/// Waits (up to 30 s) until `worker` has connected and is about to claim.
async fn wait_started(worker: &WorkerProcess) {
    wait_for(Duration::from_secs(30), "the worker to start", || async {
        worker.log_text().contains("worker started").then_some(())
    })
    .await;
}

/// Enqueues `jobs` in one transaction (one NOTIFY), in order.
async fn enqueue_all(pool: &PgPool, jobs: &[NewJob]) {
    let mut tx = pool.begin().await.unwrap();
    settle_workers::enqueue_many(&mut tx, jobs).await.unwrap();
    tx.commit().await.unwrap();
}

/// Waits (up to 60 s) until all `n` jobs completed, each on its first attempt (so each ran
/// once, in one interval).
async fn wait_all_completed(pool: &PgPool, n: usize) {
    wait_for(Duration::from_secs(60), "every job completed", || async {
        let done = common::scalar(
            pool,
            "select count(*) from all_jobs where state = 'completed'",
        )
        .await;
        (done == n as i64).then_some(())
    })
    .await;
    let again = common::scalar(pool, "select count(*) from all_jobs where attempt <> 1").await;
    assert_eq!(again, 0, "a job ran more than once");
}

/// Records the worker of every claim (the fence goes up at every claim and only then).
async fn record_claims(pool: &PgPool) {
    // Unchecked: test-only DDL, several statements in one round trip.
    sqlx::raw_sql(
        "create table cap_claims (job_id bigint primary key, owner text not null);
         create function cap_record_claim() returns trigger language plpgsql as $$
         begin
             insert into cap_claims values (new.id, new.lease_owner)
                 on conflict (job_id) do update set owner = excluded.owner;
             return null;
         end $$;
         create trigger cap_record_claim after update of fence on jobs
             for each row when (new.fence <> old.fence) execute function cap_record_claim();",
    )
    .execute(pool)
    .await
    .expect("claim recorder");
}

/// What one worker was running the instant one of its jobs started.
#[derive(Debug, sqlx::FromRow)]
struct Moment {
    owner: String,
    /// Jobs of the capped kind (`sleep`).
    capped: i64,
    /// Jobs of every kind.
    running: i64,
}

/// For every instant a job started, what its worker was running then. The count of running
/// jobs only ever rises when a job starts, so its maxima are among these instants.
async fn running_instants(pool: &PgPool) -> Vec<Moment> {
    sqlx::query_as(
        "with runs as (
             select c.owner, j.kind, j.started_at, j.finished_at
             from all_jobs j join cap_claims c on c.job_id = j.id
         ), instants as (
             select distinct owner, started_at as at from runs
         )
         select i.owner, i.at,
                count(*) filter (where r.kind = $1) as capped, count(*) as running
         from instants i
         join runs r on r.owner = i.owner and r.started_at <= i.at and r.finished_at > i.at
         group by i.owner, i.at
         order by i.at",
    )
    .bind(SLEEP)
    .fetch_all(pool)
    .await
    .expect("running instants")
}

/// The most jobs running at once across every worker.
async fn most_at_once(pool: &PgPool) -> i64 {
    common::scalar(
        pool,
        "select max((select count(*) from all_jobs o
                     where o.started_at <= j.started_at and o.finished_at > j.started_at))
         from all_jobs j",
    )
    .await
}

/// Two workers, each running its `CAP` long jobs of the capped kind: every place is taken.
/// Returns the first worker (to be killed) and its jobs, and the second, which must live on.
async fn every_place_taken(
    config: &settle::config::Config,
    pool: &PgPool,
) -> (WorkerProcess, Vec<i64>, WorkerProcess) {
    let sleeps = vec![NewJob::new(SLEEP, json!({"ms": 600_000})); 2 * CAP as usize];
    enqueue_all(pool, &sleeps).await;
    let running_for = |worker: &WorkerProcess| {
        let (pool, owner) = (pool.clone(), format!("{}-%", worker.pid));
        move || {
            let (pool, owner) = (pool.clone(), owner.clone());
            async move {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "select id from jobs where state = 'running' and lease_owner like $1
                     order by id",
                )
                .bind(owner)
                .fetch_all(&pool)
                .await
                .unwrap();
                (ids.len() == CAP as usize).then_some(ids)
            }
        }
    };
    let doomed = WorkerProcess::start(config);
    let doomed_jobs = wait_for(
        Duration::from_secs(30),
        "its places taken",
        running_for(&doomed),
    )
    .await;
    let full = WorkerProcess::start(config);
    wait_for(
        Duration::from_secs(30),
        "the other's places taken",
        running_for(&full),
    )
    .await;
    (doomed, doomed_jobs, full)
}

async fn cancel(pool: &PgPool, id: i64) -> settle_workers::JobState {
    let mut conn = pool.acquire().await.unwrap();
    match settle_workers::request_cancel(&mut conn, id).await.unwrap() {
        settle_workers::CancelOutcome::Accepted(state) => state,
        other => panic!("{other:?}"),
    }
}

/// A worker dies holding jobs of a capped kind while the live worker's places for the kind are
/// all taken: its jobs go back to the queue within seconds, shown QUEUED with no worker (their
/// attempt spent), not RUNNING under a dead owner until a place frees (here 10 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_capped_jobs_show_queued_while_the_kind_is_full() {
    let config = capped_config(200);
    let (pool, _db) = probe_pool(&config).await;
    let (doomed, orphans, mut full) = every_place_taken(&config, &pool).await;
    doomed.kill().await;
    for &id in &orphans {
        common::processes::wait_state(&pool, id, "queued").await;
        let held: (i32, Option<String>) =
            sqlx::query_as("select attempt, lease_owner from all_jobs where id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(held, (1, None), "job {id}");
    }
    assert!(full.is_running(), "{}", full.log_text());
}

/// A worker dies holding jobs of a capped kind while the live worker's places for the kind are
/// all taken: no claim can take them until one frees (here 10 minutes), and a cancel must not
/// leave one CANCELLING that long: nobody holds it, so it ends CANCELLED at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_of_a_capped_job_whose_worker_died_ends_it_while_the_kind_is_full() {
    let config = capped_config(200);
    let (pool, _db) = probe_pool(&config).await;
    let (doomed, orphans, _full) = every_place_taken(&config, &pool).await;
    doomed.kill().await;
    let expired = "select count(*) from jobs where id = $1
                   and (lease_owner is null or lease_expires_at < now())";
    wait_for(
        Duration::from_secs(30),
        "the dead worker's hold to end",
        || async { (common::scalar_of(&pool, expired, orphans[0]).await == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        cancel(&pool, orphans[0]).await,
        settle_workers::JobState::Cancelled
    );
    assert_eq!(
        common::processes::job_state(&pool, orphans[0]).await,
        "cancelled"
    );
}

/// The same, the cancel coming first: the worker (stopped) never acts on it before it dies. The
/// live worker that finds it dead ends its CANCELLING job, which no claim would take for now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_cancelling_job_ends_while_its_kind_is_full() {
    let config = capped_config(200);
    let (pool, _db) = probe_pool(&config).await;
    let (doomed, orphans, _full) = every_place_taken(&config, &pool).await;
    doomed.signal(nix::sys::signal::Signal::SIGSTOP);
    assert_eq!(
        cancel(&pool, orphans[0]).await,
        settle_workers::JobState::Cancelling
    );
    doomed.kill().await;
    common::processes::wait_state(&pool, orphans[0], "cancelled").await;
}

/// A worker freezes (SIGSTOP: as a paused VM or a worker cut off from the database) holding
/// jobs of a capped kind, and a cancel of one is asked for while the live worker's places for
/// the kind are all taken. Its liveness lock lives on, so only its lease's expiry frees the
/// job, and no claim asks for the kind until a place frees (here 10 minutes): the CANCELLING
/// job still ends CANCELLED within seconds of that expiry, as a cancel request ends a job whose
/// lease expired. The frozen worker, resumed, writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_workers_cancelling_job_ends_soon_after_its_lease_while_the_kind_is_full() {
    const LEASE_MS: u64 = 3000;
    let config = capped(short_lease(LEASE_MS, 500));
    let (pool, _db) = probe_pool(&config).await;
    let (frozen, held, mut full) = every_place_taken(&config, &pool).await;
    frozen.signal(nix::sys::signal::Signal::SIGSTOP);
    assert_eq!(
        cancel(&pool, held[0]).await,
        settle_workers::JobState::Cancelling
    );
    // The lease was last extended before the freeze: it expires within LEASE_MS from now.
    wait_for(
        Duration::from_millis(LEASE_MS + 3000),
        "the cancelling job to end within 3 s of its lease's expiry",
        || async {
            let state = common::processes::job_state(&pool, held[0]).await;
            (state == "cancelled").then_some(())
        },
    )
    .await;
    let ended: (i32, i64, Value) = job_row(&pool, held[0], "attempt, fence, errors").await;
    assert_eq!(
        ended,
        (1, 1, json!([])),
        "ended as its frozen holder's attempt"
    );

    frozen.signal(nix::sys::signal::Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: (String, i32, i64, Value) =
        job_row(&pool, held[0], "state::text, attempt, fence, errors").await;
    assert_eq!(
        after,
        ("cancelled".into(), 1, 1, json!([])),
        "the resumed worker wrote nothing"
    );
    assert!(full.is_running(), "{}", full.log_text());
}
