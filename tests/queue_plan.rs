//! The plans of the runtime's statements on its own connections. The planner chooses them
//! from the statistics of `jobs`, whose contents swing between empty and a deep backlog; where
//! they predict about one row, the cheapest-looking plans read the whole backlog: the claim as
//! a bitmap scan plus a sort, the heartbeat and the completion as a scan of all of `jobs` per
//! held job. The deep bench caught both (claims of 100-240 ms, heartbeats of 4-11 s;
//! BENCHMARKS.md, "Deep queue"). The runtime's sessions rule out the first, the statements'
//! shape the second.

mod common;

use common::{migrated_pool, test_config};
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::NewJob;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

/// The claim's branch of due jobs, as `settle_workers::claim` writes it.
const DUE: &str = "select id from jobs
                   where state = 'queued' and run_at <= now() and kind = any('{noop}')
                   order by priority desc, run_at, id
                   limit 256
                   for update skip locked";

/// The heartbeat's shape (`settle_workers::lease`): a batch of held ids, locked in a
/// materialized step, then their rows updated.
const HEARTBEAT: &str = "with held as materialized (
                             select id from unnest('{1,2,3,4,5,6,7,8}'::bigint[]) as h(id))
                         update jobs set heartbeat_at = now()
                         where jobs.id = any(array(select id from held))";

/// The shape the heartbeat had: its rows reached by a join to the batch.
const HEARTBEAT_JOINED: &str = "with held as materialized (
                                    select id from unnest('{1,2,3,4,5,6,7,8}'::bigint[]) as h(id))
                                update jobs set heartbeat_at = now()
                                from held where jobs.id = held.id";

/// The lookup every statement over held jobs starts with (`over_held_jobs`): each held id, by
/// primary key, locked.
const HELD: &str =
    "select j.id from unnest('{1,2,3}'::bigint[], '{1,1,1}'::bigint[]) as h(id, fence)
                    cross join lateral (
                        select jobs.id from jobs
                        where jobs.id = h.id and jobs.fence = h.fence
                          and jobs.state::text in ('running', 'cancelling')
                        for update
                    ) as j";

async fn plan(conn: &mut PgConnection, statement: &str) -> String {
    let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("explain {statement}")))
        .fetch_all(conn)
        .await
        .unwrap();
    lines.join("\n")
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

#[tokio::test]
async fn a_backlog_the_statistics_have_not_seen_is_claimed_in_index_order() {
    let (pool, _db) = migrated_pool(&test_config(&[])).await;
    enqueue(&pool, 20_000).await;
    let ordinary = plan(&mut pool.acquire().await.unwrap(), DUE).await;
    assert!(
        ordinary.contains("Bitmap Heap Scan") && ordinary.contains("Sort"),
        "the trap, on an ordinary session: {ordinary}"
    );
    let claim = plan(&mut control(&pool).await, DUE).await;
    assert!(
        claim.contains("Index Scan using jobs_claimable_idx") && !claim.contains("Sort"),
        "{claim}"
    );
}

#[tokio::test]
async fn a_backlog_after_an_analyze_of_the_drained_table_is_heartbeaten_through_its_ids() {
    let (pool, _db) = migrated_pool(&test_config(&[])).await;
    enqueue(&pool, 20_000).await;
    // Analyzed while drained: pages, and no live row in them.
    for statement in ["delete from jobs", "analyze jobs"] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    enqueue(&pool, 20_000).await;
    let mut control = control(&pool).await;
    // The trap: every row of jobs read and compared with each held id.
    let joined = plan(&mut control, HEARTBEAT_JOINED).await;
    assert!(joined.contains("Join Filter"), "{joined}");
    let held = plan(&mut control, HELD).await;
    assert!(held.contains("Index Scan using jobs_pkey"), "{held}");
    let heartbeat = plan(&mut control, HEARTBEAT).await;
    assert!(
        heartbeat.contains("Index Cond: (id = ANY") && !heartbeat.contains("Join Filter"),
        "{heartbeat}"
    );
}
