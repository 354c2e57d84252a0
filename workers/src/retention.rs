//! Retention: finished jobs older than the configured age are deleted. Every worker tries
//! periodically; only the one that wins a transaction-scoped advisory lock prunes, so N workers
//! do not race over the same rows.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::error::sql_state;

/// Advisory lock key of the pruner ("settle" + "prune").
const PRUNE_LOCK: i64 = 0x5e77_1e00_0000_0001;

/// Rows deleted per statement, so one prune never holds a long transaction.
const PRUNE_BATCH: i64 = 10_000;

/// Deletes the jobs finished more than `older_than` ago, a batch per transaction, while no other
/// worker is pruning (one batch an interval fell behind a queue finishing more than about 170
/// jobs a second), until none is left or `stop` fires (a shutdown waits for one batch at most).
/// Returns the rows deleted (0 when another worker holds the lock).
pub async fn prune(
    conn: &mut PgConnection,
    older_than: Duration,
    stop: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    let mut pruned = 0;
    loop {
        let batch = prune_batch(conn, older_than).await?;
        pruned += batch;
        if batch < PRUNE_BATCH as u64 || stop.is_cancelled() {
            return Ok(pruned);
        }
    }
}

/// One batch of [`prune`], in a transaction of its own, if no other worker holds the lock.
async fn prune_batch(conn: &mut PgConnection, older_than: Duration) -> Result<u64, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let locked = sqlx::query_scalar!(
        r#"select pg_try_advisory_xact_lock($1) as "locked!""#,
        PRUNE_LOCK
    )
    .fetch_one(&mut *tx)
    .await?;
    if !locked {
        return Ok(0);
    }
    let deleted = sqlx::query!(
        "delete from finished_jobs where id in (
             select id from finished_jobs
             where finished_at < now() - $1 * interval '1 millisecond'
             limit $2
         )",
        older_than.as_millis() as f64,
        PRUNE_BATCH,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    summarize_new_ranges(&mut tx).await?;
    tx.commit().await?;
    Ok(deleted)
}

/// Summarizes the block ranges of `finished_jobs` filled since the last prune, so the next
/// prune's index on `finished_at` excludes them instead of matching every unsummarized range
/// (each prune would otherwise read every page completed jobs filled since the last vacuum:
/// 0.24-0.71 s per prune in the deep benchmark, where autovacuum, and with it migration 0015's
/// `autosummarize`, was off). Reads only the new pages. Last in the prune's transaction, so its
/// short lock timeout covers nothing else; skipped, without failing the prune, while a vacuum
/// of the table holds the lock it needs, or always where the worker's role does not own it.
async fn summarize_new_ranges(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let mut attempt = conn.begin().await?;
    sqlx::query!("select set_config('lock_timeout', '50ms', true)")
        .fetch_one(&mut *attempt)
        .await?;
    let summarized =
        sqlx::query!("select brin_summarize_new_values('finished_jobs_finished_at_idx')")
            .fetch_one(&mut *attempt)
            .await;
    match summarized {
        Ok(_) => attempt.commit().await,
        // 55P03 lock_not_available: past the lock timeout. 42501 insufficient_privilege: only
        // the index's owner may summarize it; such a worker prunes without the summaries,
        // which autovacuum still makes where it runs.
        Err(e) if sql_state(&e).is_some_and(|code| matches!(&*code, "55P03" | "42501")) => {
            attempt.rollback().await
        }
        Err(e) => Err(e),
    }
}
