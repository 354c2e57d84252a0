//! The vacuumer: keeps the queue's own table compact while it drains. Every job leaves two dead
//! row versions in `jobs` (the queued one its claim replaced, the running one its ending
//! deleted), and the claim walks the partial index of queued jobs from its oldest end, which is
//! where their dead entries are: until a vacuum removes them every claim steps over them, and
//! the heap keeps growing. Autovacuum at the server's defaults visits a database about once a
//! minute, while a busy queue leaves tens of thousands of dead rows a second (measured, ten
//! drains of 100,000 jobs with autovacuum on: the drain rate fell from 39.7k to 15.2k jobs/s as
//! dead rows reached 1.77M, autovacuum having run once). So every `vacuum_interval` each worker
//! reads the table's dead rows from Postgres' statistics and, past `vacuum_dead_rows`, vacuums
//! it, unless a vacuum of it is already running; `skip_locked` covers two workers starting at
//! the same instant (the later one skips, never waits). Since `jobs` holds only live jobs
//! (finished ones are in `finished_jobs`), a vacuum costs what the backlog and the dead rows
//! cost, not the retained history.

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
            // A vacuum already running (another worker's, autovacuum's) is left to finish.
            let table = sqlx::query!(
                r#"select coalesce(n_dead_tup, 0) as "dead!",
                          exists (select from pg_stat_progress_vacuum p
                                  where p.relid = s.relid) as "vacuuming!"
                   from pg_stat_user_tables s where s.relid = 'jobs'::regclass"#
            )
            .fetch_one(&mut *conn)
            .await?;
            if table.dead < threshold || table.vacuuming {
                return Ok(None);
            }
            sqlx::query!("vacuum (skip_locked) jobs")
                .execute(&mut *conn)
                .await?;
            Ok(Some(table.dead))
        })
        .await;
        match vacuumed {
            Ok(None) => {}
            Ok(Some(dead)) => tracing::debug!(dead, "vacuumed the jobs table"),
            Err(e) => tracing::warn!(error = %e, "vacuuming the jobs table failed"),
        }
    }
}
