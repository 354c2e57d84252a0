//! Settlement reading on a streaming replica (`database.read_url`): a real hot standby made by
//! `pg_basebackup` from a private primary, and a real `settle worker` process. The job fixes its
//! input on the primary, waits until the replica has replayed it, reads its batches there and
//! writes everything else to the primary; a replica that is not there costs only the wait.

mod common;

use std::time::Duration;

use chrono_tz::Tz;
use common::cluster::Cluster;
use common::processes::{WorkerProcess, enqueue, processed, wait_for, wait_mid_way, wait_state};
use common::proxy::Proxy;
use common::settlement as support;
use common::{TestDatabase, migrated_pool, test_config};
use serde_json::json;
use settle::config::Config;
use settle::settlement::plan::{self, Plan};
use settle::settlement::replica::Reads;
use settle::settlement::transactions::NewTransaction;
use settle::settlement::{DateRange, Settings, SettleError, finalize, parts};
use sqlx::PgPool;
use support::{day, reference, settlements};

const BATCH: i64 = 200;

fn config(url: String) -> Config {
    test_config(&[
        ("database.url", json!(url)),
        ("worker.batch_size", json!(BATCH)),
    ])
}

/// A worker whose settlement batches read at `read_url`.
fn worker(config: &Config, read_url: String, max_wait_ms: u64) -> WorkerProcess {
    WorkerProcess::start_with(
        config,
        &[
            ("SETTLE_DATABASE__READ_URL", read_url),
            ("SETTLE_DATABASE__READ_MAX_WAIT_MS", max_wait_ms.to_string()),
            ("SETTLE_SETTLEMENT__PARALLEL_PARTS", "2".to_owned()),
        ],
    )
}

/// Waits until the worker's sessions (`application_name` `settle…`) have left the server behind
/// `pool`: each hands its statistics over as it exits. `pool`'s own sessions are named so too
/// when it is settle's (`migrated_pool`), and are left out by their number then.
async fn worker_sessions_ended(pool: &PgPool, pool_named_settle: bool) {
    let sql = "select count(*) from pg_stat_activity where application_name like 'settle%'";
    wait_for(
        Duration::from_secs(15),
        "the worker's sessions to end",
        || async {
            let named = common::scalar(pool, sql).await;
            let own = if pool_named_settle { pool.size() } else { 0 };
            (named <= i64::from(own)).then_some(())
        },
    )
    .await;
}

/// Sequential scans of `transactions` and scans of its primary key (how batches read: by id)
/// on the server behind `pool` so far, as its sessions have reported them. Loading rows scans
/// neither (their external ids' index is what an insert checks).
async fn transaction_scans(pool: &PgPool) -> i64 {
    common::scalar(
        pool,
        "select (coalesce(t.seq_scan, 0) + coalesce(i.idx_scan, 0))::int8
         from pg_stat_user_tables t
         join pg_stat_user_indexes i on i.relid = t.relid and i.indexrelname = 'transactions_pkey'
         where t.relname = 'transactions'",
    )
    .await
}

async fn settle_days(pool: &PgPool) -> i64 {
    enqueue(
        pool,
        "settlement",
        json!({"from": "2025-01-01", "to": "2025-01-05"}),
        3,
    )
    .await
}

/// Waits until the job's first checkpoint (its fixed input, with `total`) has committed.
async fn input_fixed(pool: &PgPool, id: i64) {
    wait_for(
        Duration::from_secs(60),
        "the job's input to be fixed",
        || async {
            let total: Option<i64> = sqlx::query_scalar("select total from all_jobs where id = $1")
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap();
            total.map(|_| ())
        },
    )
    .await;
}

async fn set_replay_paused(standby: &PgPool, paused: bool) {
    let sql = if paused {
        "select pg_wal_replay_pause()::text"
    } else {
        "select pg_wal_replay_resume()::text"
    };
    sqlx::query(sql)
        .execute(standby)
        .await
        .expect("replay control");
}

/// A private primary cluster (`None`: no server installed, the test skips), a worker
/// configuration on it, and its migrated database.
async fn private_primary() -> Option<(Cluster, Config, PgPool, TestDatabase)> {
    let primary = Cluster::start().await?;
    let config = config(primary.url("settle_replica"));
    let (pool, db) = migrated_pool(&config).await;
    Some((primary, config, pool, db))
}

/// A hot standby of `primary` (and a pool on it) whose replay is paused: rows stored from now
/// on are missing there until it resumes.
async fn paused_standby(primary: &Cluster) -> (Cluster, PgPool) {
    let standby = Cluster::standby_of(primary).await;
    let pool = PgPool::connect(&standby.url("settle_replica"))
        .await
        .unwrap();
    set_replay_paused(&pool, true).await;
    (standby, pool)
}

/// The settlements of the days [`settle_days`] settles are those of `rows`.
async fn assert_settled(pool: &PgPool, rows: &[NewTransaction]) {
    let (from, to) = (day("2025-01-01"), day("2025-01-05"));
    assert_eq!(
        settlements(pool, from, to).await,
        reference(rows, from, to, Tz::UTC)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_read_on_the_replica_once_it_has_replayed_the_input() {
    let Some((primary, config, pool, _db)) = private_primary().await else {
        return;
    };
    let early = support::store_random(&pool, 41, 12_000, 6, 5).await;
    // Rows the replica has not replayed when the job starts: a read there now would miss them.
    let (standby, replica) = paused_standby(&primary).await;
    let late = support::store_random(&pool, 42, 8_000, 6, 5).await;
    let (primary_before, replica_before) = (
        transaction_scans(&pool).await,
        transaction_scans(&replica).await,
    );

    let mut worker = worker(&config, standby.url("settle_replica"), 120_000);
    let id = settle_days(&pool).await;
    input_fixed(&pool, id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        processed(&pool, id).await,
        0,
        "no batch may be read before the replica replays the input"
    );
    set_replay_paused(&replica, false).await;
    wait_state(&pool, id, "completed").await;
    assert!(worker.terminate().await, "{}", worker.log_text());

    let all = [early, late].concat();
    assert_settled(&pool, &all).await;
    // Each batch scans the replica at least once; the primary only fixed the input. A backend
    // hands its counts to the statistics once a second at most, or as it exits: read them
    // once the worker's sessions have ended on both servers (and, for the lower bound, until
    // the last exiting session's counts arrive, which follows its leaving the session list).
    worker_sessions_ended(&pool, true).await;
    worker_sessions_ended(&replica, false).await;
    let batches = all.len() as i64 / BATCH;
    let what = format!("{batches} scans on the replica");
    wait_for(Duration::from_secs(5), &what, || async {
        let read = transaction_scans(&replica).await - replica_before;
        (read >= batches).then_some(())
    })
    .await;
    let read_on_primary = transaction_scans(&pool).await - primary_before;
    assert!(
        read_on_primary < batches / 4,
        "{read_on_primary} scans on the primary"
    );
}

/// Refunds on every day, committed on the primary while the batches read on a standby whose
/// replay was paused after the input (so no batch sees them): the finish corrects the sums by
/// them against each batch's snapshot, the standby's, and publishes the table as it is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_a_replica_read_before_are_corrected_at_the_finish() {
    let Some((primary, config, pool, _db)) = private_primary().await else {
        return;
    };
    support::store_random(&pool, 47, 40_000, 6, 5).await;
    let standby = Cluster::standby_of(&primary).await;
    let replica = PgPool::connect(&standby.url("settle_replica"))
        .await
        .unwrap();
    let mut worker = worker(&config, standby.url("settle_replica"), 120_000);
    let id = settle_days(&pool).await;
    wait_mid_way(&pool, id).await;
    set_replay_paused(&replica, true).await;
    sqlx::query(
        "update transactions set status = 'REFUNDED'
         where id in (select unnest(array[min(id), max(id)]) from transactions
                      where status = 'PAID' group by (paid_at at time zone 'UTC')::date)",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_state(&pool, id, "completed").await;
    assert!(worker.terminate().await, "{}", worker.log_text());
    let log = worker.log_text();
    assert_eq!(log.matches("settlement input fixed").count(), 1, "{log}");
    let (from, to) = (day("2025-01-01"), day("2025-01-05"));
    let now = support::settled_now(&pool, (from, to), Tz::UTC, i64::MAX).await;
    assert_eq!(settlements(&pool, from, to).await, now);
}

/// A refund still open on the primary while every batch reads on the standby, committed before
/// the finalize (the job's steps driven here, so the interleaving is exact). A standby's
/// snapshot lists no transaction in progress (`pg_current_snapshot` leaves out where a standby
/// keeps them), so the refund, running but below the snapshot's xmax once a later refund has
/// committed, looks seen by the reads: unless they record which changes they saw, the finish
/// skips its correction and publishes the rows it refunded as PAID. The later refund, above the
/// snapshots' xmin, was seen, and must not be corrected twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_in_progress_while_the_standby_reads_is_corrected_at_the_finish() {
    let Some(published) = finish_after_a_refund_open_during_standby_reads(false).await else {
        return;
    };
    assert!(published.is_ok(), "{published:?}");
}

/// The same reads recorded by a worker of the release before (during a rolling upgrade: no
/// record of the changes they saw): where a read's snapshot cannot tell whether it saw a change,
/// the job starts over rather than publish a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_reads_of_the_release_before_that_cannot_tell_start_the_job_over() {
    let Some(published) = finish_after_a_refund_open_during_standby_reads(true).await else {
        return;
    };
    assert!(
        matches!(published, Err(SettleError::Revised)),
        "{published:?}"
    );
}

/// Fixes a job's input on a private primary, opens a refund of a third of its PAID rows there,
/// commits a refund of another third, reads every batch on a standby and stores it on the
/// primary, commits the open refund and finalizes. With `release_before`, the reads are left as
/// a worker of the release before records them. Returns the finalize's outcome (`None`: no server installed), once it
/// checked that a published job settled its input as the table holds it now.
async fn finish_after_a_refund_open_during_standby_reads(
    release_before: bool,
) -> Option<Result<u64, SettleError>> {
    let (primary, config, pool, _db) = private_primary().await?;
    support::store_random(&pool, 50, 3_000, 6, 5).await;
    let standby = Cluster::standby_of(&primary).await;
    let (from, to) = (day("2025-01-01"), day("2025-01-05"));
    let settings = Settings::new(&config.settlement, BATCH);
    let mark = plan::high_water_mark(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let range = DateRange::new(from, to, 366).unwrap();
    let plan = plan::start(&mut tx, 1, range, &settings, 0, Some(mark))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let refund = common::held_open(
        &pool,
        &["update transactions set status = 'REFUNDED' where status = 'PAID' and id % 3 = 0"],
    )
    .await;
    // Another refund commits: the open one's transaction id is below the standby snapshots'
    // xmax, and this one's above their xmin, seen by the reads all the same.
    sqlx::query("update transactions set status = 'REFUNDED' where status = 'PAID' and id % 3 = 1")
        .execute(&pool)
        .await
        .unwrap();
    let mut database = config.database.clone();
    database.read_url = Some(standby.url("settle_replica"));
    let replica = Reads::new(&database, 1)
        .ready(&pool, plan.run.job_id, 0)
        .await
        .unwrap()
        .expect("the standby replays the input");
    let mut read_parts = Vec::new();
    for mut part in plan.parts.clone() {
        while !part.is_done() {
            let mut reader = replica.begin().await.unwrap().expect("a standby read");
            let read = parts::read_batch(&mut reader, &plan, &part, BATCH)
                .await
                .unwrap();
            reader.commit().await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            part = parts::store_batch(&mut tx, &plan, &part, read)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        read_parts.push(part);
    }
    refund.commit().await.unwrap();
    let on_standby = "select bool_and(on_standby) from settlement_reads";
    let on_standby: Option<bool> = sqlx::query_scalar(on_standby)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(on_standby, Some(true));
    if release_before {
        sqlx::query("update settlement_reads set seen_xids = null, on_standby = null")
            .execute(&pool)
            .await
            .unwrap();
    }

    let plan = Plan {
        parts: read_parts,
        ..plan
    };
    let mut tx = pool.begin().await.unwrap();
    let published = finalize::finalize(&mut tx, &plan).await;
    if published.is_ok() {
        tx.commit().await.unwrap();
        let now = support::settled_now(&pool, (from, to), Tz::UTC, plan.run.high_water_id).await;
        assert!(!now.is_empty());
        assert_eq!(settlements(&pool, from, to).await, now);
    }
    Some(published)
}

/// `read_url` may lead to several standbys (a load balancer): the one the job waits on has
/// replayed its input, another behind the same address has not. Each batch checks the server
/// it reads on, and reads on the primary where that one is behind: no row of the input is
/// missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_reaches_a_standby_behind_the_input_reads_on_the_primary() {
    let Some((primary, config, pool, _db)) = private_primary().await else {
        return;
    };
    let early = support::store_random(&pool, 44, 500, 6, 5).await;
    let ahead = Cluster::standby_of(&primary).await;
    let (behind, _paused) = paused_standby(&primary).await;
    // Most of the input: nearly every batch holds rows the lagging standby lacks.
    let late = support::store_random(&pool, 45, 8_000, 6, 5).await;
    // The worker's first replica connection (the one it waits on) reaches the standby that
    // keeps up; every later one the standby that is behind.
    let proxy = Proxy::start_split(Some(&ahead.address()), &behind.address()).await;
    let mut worker = worker(&config, proxy.url("settle_replica"), 120_000);
    let id = settle_days(&pool).await;
    wait_state(&pool, id, "completed").await;
    assert!(worker.terminate().await, "{}", worker.log_text());
    assert_settled(&pool, &[early, late].concat()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_does_not_answer_leaves_the_reads_on_the_primary() {
    let config = test_config(&[("worker.batch_size", json!(BATCH))]);
    let (pool, _db) = migrated_pool(&config).await;
    let rows = support::store_random(&pool, 43, 5_000, 4, 5).await;
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut worker = worker(
        &config,
        format!("postgres://postgres@127.0.0.1:{port}/x"),
        500,
    );
    let id = settle_days(&pool).await;
    wait_state(&pool, id, "completed").await;
    assert!(worker.terminate().await);
    assert!(
        worker.log_text().contains("reading on the primary"),
        "{}",
        worker.log_text()
    );
    assert_settled(&pool, &rows).await;
}

/// A standby that hangs mid-statement (a hung host: the connection open, nothing coming back,
/// so the server's own statement timeout cannot fire either) holds no batch past
/// `database.read_batch_timeout_ms`: that batch and the rest of the run read on the primary,
/// and the job completes with every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_hangs_mid_read_leaves_the_rest_of_the_run_to_the_primary() {
    let Some((primary, config, pool, _db)) = private_primary().await else {
        return;
    };
    let rows = support::store_random(&pool, 48, 5_000, 6, 5).await;
    let (standby, replica) = paused_standby(&primary).await;
    let mut worker = WorkerProcess::start_with(
        &config,
        &[
            ("SETTLE_DATABASE__READ_URL", standby.url("settle_replica")),
            ("SETTLE_DATABASE__READ_BATCH_TIMEOUT_MS", "3000".to_owned()),
            ("SETTLE_SETTLEMENT__PARALLEL_PARTS", "2".to_owned()),
        ],
    );
    let id = settle_days(&pool).await;
    // While the job waits for the standby to replay its fixed input, a lock on the input
    // (replayed there too) holds its first read on the standby; the standby hangs then, and
    // the primary's lock goes.
    input_fixed(&pool, id).await;
    let lock =
        common::held_open(&pool, &["lock table transactions in access exclusive mode"]).await;
    // A commit elsewhere flushes the lock's WAL record, for the standby to take it.
    common::scalar(&pool, "select pg_current_xact_id()::text::int8").await;
    set_replay_paused(&replica, false).await;
    common::wait_for_lock_waiter(&replica, "with days as").await;
    replica.close().await;
    let frozen = standby.freeze();
    lock.commit().await.unwrap();
    wait_state(&pool, id, "completed").await;
    drop(frozen);
    assert!(worker.terminate().await, "{}", worker.log_text());
    assert!(
        worker
            .log_text()
            .contains("a batch failed on the read replica"),
        "{}",
        worker.log_text()
    );
    assert_settled(&pool, &rows).await;
}

/// A standby promoted out from under `read_url` (a failover that moved only the read name) is
/// out of recovery but takes none of the primary's commits since: it lacks the job's run, so
/// the job reads on the primary and no row stored after the promotion is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_behind_read_url_leaves_the_reads_on_the_primary() {
    let Some((primary, config, pool, _db)) = private_primary().await else {
        return;
    };
    let early = support::store_random(&pool, 46, 500, 6, 5).await;
    let promoted = Cluster::standby_of(&primary).await;
    promoted.promote().await;
    let late = support::store_random(&pool, 47, 4_000, 6, 5).await;
    let mut worker = worker(&config, promoted.url("settle_replica"), 2_000);
    let id = settle_days(&pool).await;
    wait_state(&pool, id, "completed").await;
    assert!(worker.terminate().await, "{}", worker.log_text());
    assert_settled(&pool, &[early, late].concat()).await;
}

/// The part batches' sums stored so far, as the primary has them.
async fn stored_progress(pool: &PgPool, id: i64) -> i64 {
    common::scalar_of(
        pool,
        "select coalesce(sum(processed), 0)::int8 from settlement_parts where job_id = $1",
        id,
    )
    .await
}

/// A Postgres crash that takes the run's latest batches (committed without waiting for their
/// flush) while its parts wait for reads on the standby: their next batches, read from where the
/// run left off, land on the recovered primary, which lacks the batches before them. The run
/// finds the database behind, resumes from what it kept and settles exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_crash_that_takes_the_latest_batches_leaves_the_settlement_exact() {
    let Some((primary, config, pool, _db)) = private_primary().await else {
        return;
    };
    let rows = support::store_random(&pool, 49, 20_000, 6, 5).await;
    // Nothing but the run's own commits writes in the window below (a vacuum flushes the WAL
    // as it writes pages), and each batch takes 20 ms: the run is still going when it opens.
    for sql in [
        "alter system set autovacuum = off",
        "select pg_reload_conf()",
    ] {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    }
    sqlx::raw_sql(
        "create function slow_batch() returns trigger language plpgsql
             as $$ begin perform pg_sleep(0.02); return null; end $$;
         create trigger slow_batch after insert on settlement_batches
             for each statement execute function slow_batch();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let standby = Cluster::standby_of(&primary).await;
    let mut worker = WorkerProcess::start_with(
        &config,
        &[
            ("SETTLE_DATABASE__READ_URL", standby.url("settle_replica")),
            (
                "SETTLE_DATABASE__READ_BATCH_TIMEOUT_MS",
                "120000".to_owned(),
            ),
            ("SETTLE_SETTLEMENT__PARALLEL_PARTS", "2".to_owned()),
            // No heartbeat (a synchronous commit, which flushes) in the window either.
            ("SETTLE_WORKER__LEASE_MS", "120000".to_owned()),
            ("SETTLE_WORKER__HEARTBEAT_MS", "60000".to_owned()),
        ],
    );
    let id = settle_days(&pool).await;
    let started = wait_for(Duration::from_secs(60), "stored batches", || async {
        let stored = stored_progress(&pool, id).await;
        (stored > 0).then_some(stored)
    })
    .await;
    // From here the run's commits stay in the server's memory.
    let wal_writer = primary.freeze_wal_writer();
    wait_for(Duration::from_secs(30), "more stored batches", || async {
        (stored_progress(&pool, id).await >= started + 4 * BATCH).then_some(())
    })
    .await;
    // The parts' reads hang on the standby; their statements on the primary end meanwhile.
    let frozen = standby.freeze();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = stored_progress(&pool, id).await;
    primary.crash().await;
    drop(wal_writer);
    primary.start_again().await;
    let after = stored_progress(&pool, id).await;
    assert!(
        after < before,
        "the crash took batches: {after} of {before} kept"
    );
    drop(frozen);
    wait_state(&pool, id, "completed").await;
    assert!(worker.terminate().await, "{}", worker.log_text());
    assert_settled(&pool, &rows).await;
}
