//! The vacuumer: keeps the queue's own table compact while it drains. Every job leaves two dead
//! row versions in `jobs` (the queued one its claim replaced, the running one its ending
//! deleted), and the claim walks the partial index of queued jobs from its oldest end, which is
//! where their dead entries are: until a vacuum removes them every claim steps over them, and
//! the heap keeps growing. Autovacuum at the server's defaults visits a database about once a
//! minute, while a busy queue leaves tens of thousands of dead rows a second (measured, ten
//! drains of 100,000 jobs with autovacuum on: the drain rate fell from 39.7k to 15.2k jobs/s as
//! dead rows reached 1.77M, autovacuum having run once). So every `vacuum_interval` each worker
//! reads the table's dead rows from Postgres' statistics and, past `vacuum_dead_rows` (a tenth
//! of it once the queue is drained, see [`DRAINED_FRACTION`]), vacuums it, unless another
//! session holds a lock the vacuum would wait for (another vacuum, an `ANALYZE`, an index
//! build); `skip_locked` covers two workers starting at the same instant, or autovacuum
//! starting between the check and the statement (the later one skips, never waits). Postgres
//! warns of every such skip, which is expected here, so the vacuumer runs on a session of its
//! own (one connection per worker, outside the pool) with `client_min_messages =
//! error`: the setting can never leak to another statement, and an error drops the session for
//! a fresh one. Such a holder is left to finish, except autovacuum (its vacuums and its
//! analyzes alike): throttled by its cost delay it can take tens of seconds on a busy `jobs`,
//! while dead rows pile up (measured: drains fell from ~14k to 3-5k jobs/s for two cycles of the
//! deep bench). The worker then queues its own `VACUUM jobs` behind it; Postgres cancels an
//! autovacuum that blocks another session's lock request once `deadlock_timeout` has passed
//! (never one that prevents wraparound: the wait then ends at [`TAKEOVER_WAIT`], quietly), and
//! the worker's unthrottled vacuum goes on. Since `jobs` holds only live jobs (finished ones
//! are in `finished_jobs`), a vacuum costs what the backlog and the dead rows cost, not the
//! retained history.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection};

use super::pause;
use crate::error::sql_state;
use crate::runtime::Shared;

/// Until shutdown: every `vacuum_interval`, vacuums `jobs` if it holds `vacuum_dead_rows` dead
/// rows or more. Returns at once when `vacuum_dead_rows` is 0 (left to autovacuum).
pub(crate) async fn run(shared: Arc<Shared>) {
    let threshold = shared.settings.vacuum_dead_rows;
    if threshold == 0 {
        return;
    }
    let options = shared.pool.connect_options().as_ref().clone().options([
        ("client_min_messages", "error".to_owned()),
        ("lock_timeout", format!("{}ms", TAKEOVER_WAIT.as_millis())),
    ]);
    let mut session: Option<PgConnection> = None;
    loop {
        pause(&shared.shutdown, shared.settings.vacuum_interval).await;
        if shared.shutdown.is_cancelled() {
            return;
        }
        let conn = match session.as_mut() {
            Some(conn) => conn,
            None => match PgConnection::connect_with(&options).await {
                Ok(conn) => session.insert(conn),
                Err(e) => {
                    tracing::warn!(error = %e, "connecting the vacuumer failed");
                    continue;
                }
            },
        };
        let vacuumed = tokio::select! {
            vacuumed = vacuum_if_due(conn, threshold) => vacuumed,
            // Shutdown does not wait for a vacuum (or a takeover's wait): the session closes
            // and the server finishes or drops the vacuum on its own.
            () = shared.shutdown.cancelled() => return,
        };
        match vacuumed {
            Ok(None) => {}
            Ok(Some(dead)) => tracing::debug!(dead, "vacuumed the jobs table"),
            Err(e) => {
                tracing::warn!(error = %e, "vacuuming the jobs table failed");
                session = None;
            }
        }
    }
}

/// How long a vacuum queued behind autovacuum's waits for it to give way.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// What part of `vacuum_dead_rows` is enough once the queue is drained. A drain that ends
/// below the threshold leaves its dead rows' entries at the claimable index's oldest end for
/// the idle workers' claims (one per lane each poll) to step over until some later vacuum;
/// vacuuming a table without live rows costs little. A tidy-up, not a measured gain: the slow
/// empty claims the deep bench logged (111-231 ms) turned out to be polls while its own
/// enqueue transaction held back the horizon, when no vacuum can remove those rows either.
const DRAINED_FRACTION: i64 = 10;

/// Whether `dead` rows (beside `live` ones) call for a vacuum: `threshold` of them, or a tenth
/// of that once the queue is drained.
fn due(dead: i64, live: i64, threshold: i64) -> bool {
    dead >= threshold || (live == 0 && dead >= (threshold / DRAINED_FRACTION).max(1))
}

/// Vacuums `jobs` if its dead rows are [`due`] for it, unless another session holds a lock the
/// vacuum would wait for (left to finish, except autovacuum, which is taken over); returns the
/// dead rows it found when it vacuumed.
async fn vacuum_if_due(
    conn: &mut PgConnection,
    threshold: i64,
) -> Result<Option<i64>, sqlx::Error> {
    // Whoever holds a lock on `jobs` that a vacuum's SHARE UPDATE EXCLUSIVE waits for:
    // another vacuum, or an ANALYZE (autovacuum's analyzes hold it too, throttled alike).
    let table = sqlx::query!(
        r#"select coalesce(n_dead_tup, 0) as "dead!", coalesce(n_live_tup, 0) as "live!",
                  (select a.backend_type from pg_locks l
                   join pg_stat_activity a on a.pid = l.pid
                   where l.locktype = 'relation' and l.relation = s.relid and l.granted
                     -- Relation oids repeat across databases.
                     and l.database = (select oid from pg_database
                                       where datname = current_database())
                     and l.mode in ('ShareUpdateExclusiveLock', 'ShareLock',
                                    'ShareRowExclusiveLock', 'ExclusiveLock',
                                    'AccessExclusiveLock')
                     and l.pid <> pg_backend_pid()
                   limit 1) as holder
           from pg_stat_user_tables s where s.relid = 'jobs'::regclass"#
    )
    .fetch_one(&mut *conn)
    .await?;
    if !due(table.dead, table.live, threshold) {
        return Ok(None);
    }
    let vacuumed = match table.holder.as_deref() {
        None => {
            sqlx::query!("vacuum (skip_locked) jobs")
                .execute(conn)
                .await
        }
        Some("autovacuum worker") => sqlx::query!("vacuum jobs").execute(conn).await,
        Some(_) => return Ok(None),
    };
    match vacuumed {
        Ok(_) => Ok(Some(table.dead)),
        // 55P03: still held after TAKEOVER_WAIT (another worker took over first, or an
        // autovacuum that prevents wraparound, which Postgres never cancels).
        Err(e) if sql_state(&e).as_deref() == Some("55P03") => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::due;

    #[test]
    fn a_drained_queue_is_vacuumed_at_a_tenth_of_the_threshold() {
        assert!(due(100_000, 5_000, 100_000));
        assert!(!due(99_999, 5_000, 100_000));
        assert!(due(10_000, 0, 100_000));
        assert!(!due(9_999, 0, 100_000));
        assert!(!due(0, 0, 5));
        assert!(due(1, 0, 5));
    }
}
