//! The vacuumer: keeps the queue's own table compact while it drains. Every job leaves two dead
//! row versions in `jobs` (the queued one its claim replaced, the running one its ending
//! deleted), and the claim walks the partial index of queued jobs from its oldest end, which is
//! where their dead entries are: until a vacuum removes them every claim steps over them, and
//! the heap keeps growing. Autovacuum at the server's defaults visits a database about once a
//! minute, while a busy queue leaves tens of thousands of dead rows a second (measured, ten
//! drains of 100,000 jobs with autovacuum on: the drain rate fell from 39.7k to 15.2k jobs/s as
//! dead rows reached 1.77M, autovacuum having run once). So every `vacuum_interval` each worker
//! reads the table's dead rows from Postgres' statistics and, past `vacuum_dead_rows`, vacuums
//! it. `skip_locked` lets one vacuum run at a time: a worker that finds one running skips,
//! never waits. Since `jobs` holds only live jobs (finished ones are in `finished_jobs`), a
//! vacuum costs what the backlog and the dead rows cost, not the retained history.

use std::sync::Arc;

use super::pause;
use crate::db::on_conn;
use crate::runtime::Shared;

/// Until shutdown: every `vacuum_interval`, vacuums `jobs` if it holds `vacuum_dead_rows` dead
/// rows or more. Returns at once when `vacuum_dead_rows` is 0 (left to autovacuum).
pub(crate) async fn run(shared: Arc<Shared>) {
    let threshold = shared.settings.vacuum_dead_rows;
    if threshold == 0 {
        return;
    }
    loop {
        pause(&shared.shutdown, shared.settings.vacuum_interval).await;
        if shared.shutdown.is_cancelled() {
            return;
        }
        let vacuumed = on_conn(&shared.pool, async |conn| {
            let dead = sqlx::query_scalar!(
                "select n_dead_tup from pg_stat_user_tables where relid = 'jobs'::regclass"
            )
            .fetch_optional(&mut *conn)
            .await?
            .flatten()
            .unwrap_or(0);
            if dead < threshold {
                return Ok(None);
            }
            // A vacuum already running is not news: Postgres' "skipping vacuum" warning is
            // kept off this session's log.
            sqlx::query!("set client_min_messages = error")
                .execute(&mut *conn)
                .await?;
            sqlx::query!("vacuum (skip_locked) jobs")
                .execute(&mut *conn)
                .await?;
            sqlx::query!("reset client_min_messages")
                .execute(&mut *conn)
                .await?;
            Ok(Some(dead))
        })
        .await;
        match vacuumed {
            Ok(None) => {}
            Ok(Some(dead)) => tracing::debug!(dead, "vacuumed the jobs table"),
            Err(e) => tracing::warn!(error = %e, "vacuuming the jobs table failed"),
        }
    }
}
