//! The claim's plan on the worker's own connections. The planner chooses it from the
//! statistics of `jobs`, whose contents swing between empty and a deep backlog. Where they
//! predict about one queued row (a table not analyzed since its backlog arrived), a bitmap
//! scan of the claimable index and a sort look cheapest, and every claim then reads and sorts
//! the whole backlog to take its batch (the deep bench caught it: 100-240 ms per claim,
//! BENCHMARKS.md, "Deep queue"). The runtime's sessions rule the bitmap out.

mod common;

use common::{migrated_pool, test_config};
use serde_json::json;
use settle::jobs::kind::NOOP;
use settle_workers::NewJob;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The claim's branch of due jobs, as `settle_workers::claim` writes it.
const DUE: &str = "select id from jobs
                   where state = 'queued' and run_at <= now() and kind = any('{noop}')
                   order by priority desc, run_at, id
                   limit 256
                   for update skip locked";

async fn plan(conn: &mut PgConnection) -> String {
    let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("explain {DUE}")))
        .fetch_all(conn)
        .await
        .unwrap();
    lines.join("\n")
}

#[tokio::test]
async fn the_runtime_claims_in_index_order_whatever_the_statistics_say() {
    let config = test_config(&[]);
    let (pool, _db) = migrated_pool(&config).await;
    // A backlog of 20,000 the statistics have not seen: the planner expects one row.
    let jobs = vec![NewJob::new(NOOP, json!({})); 20_000];
    settle_workers::enqueue_many(&mut pool.acquire().await.unwrap(), &jobs)
        .await
        .unwrap();
    let ordinary = plan(&mut pool.acquire().await.unwrap()).await;
    assert!(
        ordinary.contains("Bitmap Heap Scan") && ordinary.contains("Sort"),
        "the trap, on an ordinary session: {ordinary}"
    );

    let options = settle_workers::runtime::control_options(&pool.connect_options());
    let mut control = PgConnection::connect_with(&options).await.unwrap();
    let claimed = plan(&mut control).await;
    assert!(
        claimed.contains("Index Scan using jobs_claimable_idx") && !claimed.contains("Sort"),
        "{claimed}"
    );
}
