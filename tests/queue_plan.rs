//! The plans of the runtime's own statements on its own connections. The planner chooses them
//! from the statistics of `jobs`, whose contents swing between empty and a deep backlog; where
//! they predict about one row, the cheapest-looking plans read the whole backlog: the claim as
//! a bitmap scan plus a sort, the statements over held jobs as a scan of all of `jobs` per held
//! job, and the claim's update as a walk of the whole primary key. The deep bench caught all
//! three (claims of 100-240 ms, heartbeats of 4-11 s, claims of 5.7-6.5 s; BENCHMARKS.md, "Deep
//! queue"). The runtime's sessions rule out the first, the statements' shape the others.
//! Each test runs the real statement, then explains the statement the session prepared for it.

mod common;

use std::time::Duration;

use common::{migrated_pool, test_config};
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::NewJob;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

const LEASE: Duration = Duration::from_secs(60);

/// The plan of `statement` (SQL) on `conn`.
async fn plan(conn: &mut PgConnection, statement: &str) -> String {
    let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("explain {statement}")))
        .fetch_all(conn)
        .await
        .unwrap();
    lines.join("\n")
}

/// The plan of the statement `conn` prepared whose text holds `marker`, run with `args` (SQL).
async fn prepared_plan(conn: &mut PgConnection, marker: &str, args: &str) -> String {
    let name: String = sqlx::query_scalar(
        "select name from pg_prepared_statements
         where strpos(statement, $1) > 0 and statement not ilike 'explain%'",
    )
    .bind(marker)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    plan(conn, &format!("execute {name}({args})")).await
}

async fn enqueue(pool: &PgPool, n: usize) {
    let jobs = vec![NewJob::new(NOOP, json!({})); n];
    settle_workers::enqueue_many(&mut pool.acquire().await.unwrap(), &jobs)
        .await
        .unwrap();
}

async fn control(pool: &PgPool) -> PgConnection {
    let options = settle_workers::runtime::control_options(&pool.connect_options());
    PgConnection::connect_with(&options).await.unwrap()
}

/// The plan `conn` makes for the claim of a batch of `noop` jobs. The claim runs once first,
/// for a kind without jobs (so the session prepares it and nothing changes).
async fn claim_plan(conn: &mut PgConnection) -> String {
    let kinds = ["absent".to_owned()];
    let claimed = settle_workers::claim::claim(conn, "w", 256, LEASE, &kinds, &[])
        .await
        .unwrap();
    assert!(claimed.is_empty());
    prepared_plan(conn, "with expired as", "'w', 256, 60000, '{noop}'").await
}

#[tokio::test]
async fn a_backlog_the_statistics_have_not_seen_is_claimed_in_index_order() {
    let (pool, _db) = migrated_pool(&test_config(&[])).await;
    enqueue(&pool, 20_000).await;
    // The trap, for the claim's branch of due jobs on its own: bitmap and sort on an ordinary
    // session. (The whole claim statement sits near the same tie and lands on either side.)
    let due = "select id from jobs
               where state = 'queued' and run_at <= now() and kind = any('{noop}')
               order by priority desc, run_at, id
               limit 256
               for update skip locked";
    let ordinary = plan(&mut pool.acquire().await.unwrap(), due).await;
    assert!(
        ordinary.contains("Bitmap Heap Scan") && ordinary.contains("Sort"),
        "the trap, on an ordinary session: {ordinary}"
    );
    let mut control = control(&pool).await;
    let branch = plan(&mut control, due).await;
    assert!(
        branch.contains("Index Scan using jobs_claimable_idx") && !branch.contains("Sort"),
        "{branch}"
    );
    // The runtime's claim itself, as its session prepared it: the due jobs in index order.
    let claim = claim_plan(&mut control).await;
    assert!(
        claim.contains("Index Scan using jobs_claimable_idx")
            && !claim.contains("Bitmap")
            && !claim.contains("Sort Key: jobs"),
        "{claim}"
    );
}

/// A backlog of 20,000 jobs in a table last analyzed while drained (pages, and no live row in
/// them), and a runtime session to plan against it.
async fn backlog_analyzed_while_drained(pool: &PgPool) -> PgConnection {
    enqueue(pool, 20_000).await;
    for statement in ["delete from jobs", "analyze jobs"] {
        sqlx::query(statement).execute(pool).await.unwrap();
    }
    enqueue(pool, 20_000).await;
    control(pool).await
}

#[tokio::test]
async fn a_backlog_after_an_analyze_of_the_drained_table_is_heartbeaten_through_its_ids() {
    let (pool, _db) = migrated_pool(&test_config(&[])).await;
    let mut control = backlog_analyzed_while_drained(&pool).await;
    // The trap, in the shape the heartbeat had: every row of jobs read for each held id.
    let joined = plan(
        &mut control,
        "with held as materialized (select id from unnest('{1,2,3}'::bigint[]) as h(id))
         update jobs set heartbeat_at = now() from held where jobs.id = held.id",
    )
    .await;
    assert!(joined.contains("Join Filter"), "{joined}");

    settle_workers::lease::heartbeat(&mut control, &[(1, 1)], LEASE)
        .await
        .unwrap();
    let args = "'{1,2,3}'::bigint[], '{1,1,1}'::bigint[], 60000";
    let heartbeat = prepared_plan(&mut control, "lease_expires_at = now() +", args).await;
    // Each held id found by primary key (not by walking the partial index of held jobs), and
    // their rows updated through an index condition, not a join.
    assert!(
        heartbeat.contains("Index Cond: (id = h.id)")
            && heartbeat.contains("Index Cond: (id = ANY")
            && !heartbeat.contains("jobs_lease_expiry_idx")
            && !heartbeat.contains("Join Filter"),
        "{heartbeat}"
    );
}

/// The plan `conn` makes for a claim, as it prepared it: uncapped, or with a kind capped.
async fn claimed_plan(conn: &mut PgConnection, capped: bool) -> String {
    let kinds = ["absent".to_owned()];
    let rooms = [settle_workers::claim::Room {
        kind: "absent".to_owned(),
        places: 1,
    }];
    let rooms = if capped { &rooms[..] } else { &[] };
    settle_workers::claim::claim(conn, "w", 256, LEASE, &kinds, rooms)
        .await
        .unwrap();
    if capped {
        let args = "'w', 256, 60000, '{noop,absent}', '{absent}', '{1}'";
        prepared_plan(conn, "candidates as", args).await
    } else {
        prepared_plan(conn, "c limit $2", "'w', 256, 60000, '{noop}'").await
    }
}

#[tokio::test]
async fn a_backlog_after_an_analyze_of_the_drained_table_is_claimed_through_its_ids() {
    let (pool, _db) = migrated_pool(&test_config(&[])).await;
    let mut control = backlog_analyzed_while_drained(&pool).await;
    // Both claims update the rows they picked through an index condition on the primary key.
    // Joined to the picked ids instead, a planner that took `jobs` for nearly empty walked the
    // primary key whole for each claim (the deep bench: claims of 5.7-6.5 s).
    for capped in [false, true] {
        let claim = claimed_plan(&mut control, capped).await;
        assert!(
            claim.contains("Index Cond: (id = ANY") && !claim.contains("Join Filter"),
            "capped {capped}: {claim}"
        );
    }
}

#[tokio::test]
async fn a_backlog_after_an_analyze_of_the_drained_table_is_probed_through_its_ids() {
    let (pool, _db) = migrated_pool(&test_config(&[])).await;
    let mut control = backlog_analyzed_while_drained(&pool).await;
    let dead = ["gone+lock".to_owned()];
    settle_workers::liveness::probe(&mut control, "w", &dead)
        .await
        .unwrap();
    let args = "'w', '{gone+lock}', '+lock'";
    let probe = prepared_plan(&mut control, "with unlocked as", args).await;
    // The leases expired through an index condition on the primary key, not a join.
    assert!(
        probe.contains("Index Cond: (id = ANY") && !probe.contains("Join Filter"),
        "{probe}"
    );
}

/// A fresh ordinary session (not the pool's, so it has prepared nothing yet).
async fn ordinary(pool: &PgPool) -> PgConnection {
    PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap()
}

/// The statements that reach one job by its id (and its fence and state) find it by primary
/// key: with the state compared as an enum, its predicate implied a partial index's, and a
/// planner that took `jobs` for nearly empty walked that whole index instead (the held jobs'
/// after a drain, the queued jobs' on a deep queue). The job's checkpoint and progress
/// statements share `lease::reload`'s condition.
#[tokio::test]
async fn one_job_is_reached_by_its_primary_key_whatever_the_statistics() {
    let (pool, _db) = migrated_pool(&test_config(&[])).await;
    let mut control = backlog_analyzed_while_drained(&pool).await;
    let noop = [NOOP.to_owned()];
    let claimed = settle_workers::claim::claim(&mut control, "w", 1, LEASE, &noop, &[])
        .await
        .unwrap();
    // The claim took the oldest job; the next id is still queued.
    let (running, queued) = (&claimed[0], claimed[0].id + 1);
    let held = format!("{}, {}", running.id, running.fence);

    let mut conn = ordinary(&pool).await;
    settle_workers::lease::reload(&mut conn, running.id, running.fence)
        .await
        .unwrap();
    let reload = prepared_plan(&mut conn, "cancel_requested from jobs", &held).await;
    let mut conn = ordinary(&pool).await;
    settle_workers::finish::lock_for_completion(&mut conn, running.id, running.fence)
        .await
        .unwrap();
    let completion = prepared_plan(&mut conn, "cancel_requested from jobs", &held).await;
    let mut conn = ordinary(&pool).await;
    settle_workers::request_cancel(&mut conn, running.id)
        .await
        .unwrap();
    settle_workers::request_cancel(&mut conn, queued)
        .await
        .unwrap();
    let cancelling = prepared_plan(&mut conn, "set cancel_requested = true", "1").await;
    let cancelled = prepared_plan(&mut conn, "with ended as", "'{1}'").await;
    for plan in [reload, completion, cancelling, cancelled] {
        assert!(
            plan.contains("Index Scan using jobs_pkey")
                && !plan.contains("jobs_lease_expiry_idx")
                && !plan.contains("jobs_claimable_idx"),
            "{plan}"
        );
    }
}
