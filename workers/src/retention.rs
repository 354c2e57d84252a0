//! Retention: finished jobs older than the configured age are deleted. Every worker tries
//! periodically; only the one that wins a transaction-scoped advisory lock prunes, so N workers
//! do not race over the same rows.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

/// Advisory lock key of the pruner ("settle" + "prune").
const PRUNE_LOCK: i64 = 0x5e77_1e00_0000_0001;

/// Rows deleted per statement, so one prune never holds a long transaction.
const PRUNE_BATCH: i64 = 10_000;

/// Deletes up to one batch of jobs finished more than `older_than` ago, if no other worker is
/// pruning. Returns the rows deleted (0 when another worker holds the lock).
pub async fn prune(conn: &mut PgConnection, older_than: Duration) -> Result<u64, sqlx::Error> {
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
    tx.commit().await?;
    Ok(deleted)
}
