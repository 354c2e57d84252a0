//! Migrating: the embedded schema, applied by one process at a time, each migration waiting
//! for its locks only so long before it gives way to the service and tries again; and the
//! check that keeps `api` and `worker` off an unmigrated schema.

use std::time::Duration;

use settle_workers::error::sql_state;
use sqlx::migrate::{MigrateError, Migration, Migrator};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

use super::{DbError, ensure_utf8};

/// The schema, embedded in the binary so `settle migrate` works from any directory.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Key of the session lock one migrating process holds at a time ("stlm").
const MIGRATION_LOCK: i64 = 0x7374_6c6d;

/// Pause between two tries of [`MIGRATION_LOCK`].
const MIGRATION_LOCK_PAUSE: Duration = Duration::from_millis(100);

/// The pause after a migration's first try that timed out on a lock; it doubles after each
/// further one.
const LOCK_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Tries of a migration under its lock timeout before one that waits as long as it must.
const LOCK_TRIES: u32 = 5;

/// Applies every pending migration. Processes migrating at once (an `api` and a `worker` with
/// `database.migrate_on_start`) take turns on a lock of their own, tried on a connection of
/// its own every 100 ms rather than waited for: a session waiting inside `pg_advisory_lock`
/// (as sqlx's migrator does) holds a snapshot, which the other process's `create index
/// concurrently` (migration 0014) waits for, and Postgres ends that cycle as a deadlock.
/// Each migration waits at most `lock_timeout` for a lock, then gives way and is tried again.
pub async fn migrate(pool: &PgPool, lock_timeout: Duration) -> Result<(), DbError> {
    ensure_utf8(pool).await?;
    let mut holder = PgConnection::connect_with(&pool.connect_options()).await?;
    while !sqlx::query_scalar!(
        r#"select pg_try_advisory_lock($1) as "locked!""#,
        MIGRATION_LOCK
    )
    .fetch_one(&mut holder)
    .await?
    {
        tokio::time::sleep(MIGRATION_LOCK_PAUSE).await;
    }
    let applied = applied_migrations(pool).await?;
    let newer = newer_of(&applied);
    let pending = pending_of(&applied);
    let migrated = if let Some(version) = edited_of(&applied) {
        // sqlx's migrator checks this too, but only when something is pending.
        Err(DbError::Edited { version })
    } else if !newer.is_empty() && pending.is_empty() {
        // A newer release migrated the database (a rolling upgrade under way, or this one
        // rolled back): there is nothing of ours to apply, and sqlx's migrator would refuse
        // to start on versions it does not know.
        tracing::warn!(
            versions = ?newer,
            "the database was migrated by a newer release (migrations this release does not \
             know); this release's are all applied, so nothing is migrated"
        );
        Ok(())
    } else {
        apply_pending(pool, pending, lock_timeout).await
    };
    // Closing the session releases the lock as well.
    let _ = holder.close().await;
    migrated
}

/// Applies `pending` in order, one at a time, each on a session of its own. A
/// migration in a transaction waits at most `lock_timeout` (zero: as long as it takes) for
/// each lock it needs: queued for a table's lock, it holds up every later reader and writer
/// of that table, so one stuck behind a long transaction (a bulk load, a report) would stall
/// the service until that ended. Timed out, it has rolled back whole; it is tried again after
/// a pause (1 s, doubling), each time with a warning naming the oldest open transactions.
/// After [`LOCK_TRIES`] such tries (about 30 s of pauses: long transactions that keep
/// overlapping would starve it for ever) the last one waits as long as it must, as a
/// migration without a timeout does. A migration outside a transaction (0014's `create index
/// concurrently`, which waits for older transactions without blocking anyone, and which a
/// timeout would leave as an invalid index) waits as long as it must from the start.
async fn apply_pending(
    pool: &PgPool,
    pending: Vec<&'static Migration>,
    lock_timeout: Duration,
) -> Result<(), DbError> {
    for migration in pending {
        apply_waiting_for_locks(pool, migration, lock_timeout).await?;
    }
    Ok(())
}

/// Applies `migration`, tried again each time it timed out on a lock (see [`apply_pending`]),
/// each try on a session of its own whose `lock_timeout` is set as it opens.
async fn apply_waiting_for_locks(
    pool: &PgPool,
    migration: &Migration,
    lock_timeout: Duration,
) -> Result<(), DbError> {
    let mut pause = LOCK_RETRY_PAUSE;
    let mut debris_dropped = false;
    let mut tries = 0;
    loop {
        tries += 1;
        let wait = if migration.no_tx || tries > LOCK_TRIES {
            Duration::ZERO
        } else {
            lock_timeout
        };
        let error = match apply_once(pool, migration, wait).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let code = match &error {
            MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => sql_state(e),
            _ => None,
        };
        if migration.no_tx && code.as_deref() == Some("42P07") && !debris_dropped {
            debris_dropped = true;
            match drop_interrupted_indexes(pool, migration).await {
                Ok(dropped) if !dropped.is_empty() => {
                    tracing::warn!(
                        version = migration.version,
                        migration = %migration.description,
                        indexes = ?dropped,
                        "an earlier try of this migration was interrupted while it built \
                         indexes concurrently, leaving them invalid; dropped them, trying again"
                    );
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot look for interrupted indexes"),
            }
        }
        if code.as_deref() != Some("55P03") || wait.is_zero() {
            return Err(error.into());
        }
        let oldest = oldest_transactions(pool).await.unwrap_or_default();
        let next = if tries < LOCK_TRIES {
            "will be tried again"
        } else {
            "will be tried once more, waiting as long as it takes"
        };
        tracing::warn!(
            version = migration.version,
            migration = %migration.description,
            lock_timeout = ?wait,
            retry_in = ?pause,
            oldest_transactions = %oldest,
            "a migration waited its whole lock_timeout for a lock that other sessions hold \
             (database.migration_lock_timeout_ms); it rolled back and {next}"
        );
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

/// One try of `migration` on a session of its own that waits at most `wait` for a lock (zero:
/// as long as it takes). The server checks that the session's client is still there: killed
/// mid-`create index concurrently`, a migrate would otherwise leave the build running to a
/// valid index its record never names, and every later try would fail on it.
async fn apply_once(
    pool: &PgPool,
    migration: &Migration,
    wait: Duration,
) -> Result<(), MigrateError> {
    let options = (*pool.connect_options()).clone().options([
        ("lock_timeout", format!("{}ms", wait.as_millis())),
        ("client_connection_check_interval", "1000ms".to_owned()),
    ]);
    let session = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let applied = MIGRATOR.run_to(migration.version, &session).await;
    session.close().await;
    applied
}

/// Drops the invalid indexes that `migration` (outside a transaction) creates by name: what
/// an interrupted `create index concurrently` leaves (its connection lost, its client killed
/// and the server noticing), on which every later try fails with "relation already exists".
/// One that a session may be building right now (any build this role cannot see into) is
/// left alone. Returns the names dropped.
async fn drop_interrupted_indexes(
    pool: &PgPool,
    migration: &Migration,
) -> Result<Vec<String>, sqlx::Error> {
    let names = concurrently_built(migration.sql.as_str());
    let invalid = sqlx::query_scalar!(
        r#"select c.relname::text as "name!"
           from pg_index i
           join pg_class c on c.oid = i.indexrelid
           join pg_namespace n on n.oid = c.relnamespace
           where not i.indisvalid and n.nspname = current_schema()
             and c.relname = any($1::text[])
             and not exists (select from pg_stat_progress_create_index p
                             where p.index_relid = i.indexrelid or p.index_relid is null)"#,
        &names
    )
    .fetch_all(pool)
    .await?;
    for name in &invalid {
        // Dynamic: DROP INDEX takes no parameters; the name is quoted.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop index concurrently if exists {}",
            super::quote_ident(name)
        )))
        .execute(pool)
        .await?;
    }
    Ok(invalid)
}

/// The names that `sql` builds with `create [unique] index concurrently [if not exists] name`.
fn concurrently_built(sql: &str) -> Vec<String> {
    // Unquoted names fold to lower case, as Postgres folds them; quoted ones keep theirs.
    let words: Vec<String> = sql
        .split_whitespace()
        .map(|w| match w.strip_prefix('"') {
            Some(quoted) => quoted.trim_end_matches('"').to_owned(),
            None => w.to_lowercase(),
        })
        .collect();
    words
        .windows(2)
        .enumerate()
        .filter(|(_, pair)| pair[0] == "index" && pair[1] == "concurrently")
        .filter_map(|(at, _)| {
            words[at + 2..]
                .iter()
                .find(|w| !matches!(w.as_str(), "if" | "not" | "exists"))
                .cloned()
        })
        .collect()
}

/// The three oldest open transactions of other sessions of this database, for the operator
/// to find what a migration waits for: "pid 4711 (psql, idle in transaction) open for 17.2 s".
async fn oldest_transactions(pool: &PgPool) -> Result<String, sqlx::Error> {
    let rows = sqlx::query!(
        r#"select pid as "pid!", coalesce(nullif(application_name, ''), '?') as "application!",
                  coalesce(state, '?') as "state!",
                  extract(epoch from clock_timestamp() - xact_start)::float8 as "open_s!"
           from pg_stat_activity
           where datname = current_database() and pid <> pg_backend_pid()
             and xact_start is not null
           order by xact_start
           limit 3"#
    )
    .fetch_all(pool)
    .await?;
    let described: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "pid {} ({}, {}) open for {:.1} s",
                r.pid, r.application, r.state, r.open_s
            )
        })
        .collect();
    Ok(described.join("; "))
}

/// A migration the database has applied.
struct Applied {
    version: i64,
    /// The sha384 of the file it was applied from, as sqlx records it.
    checksum: Vec<u8>,
}

/// The migrations the database has applied (none without the table).
async fn applied_migrations(pool: &PgPool) -> Result<Vec<Applied>, DbError> {
    let has_table = sqlx::query_scalar!(
        r#"select to_regclass('_sqlx_migrations') is not null as "has_table!""#
    )
    .fetch_one(pool)
    .await?;
    if !has_table {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as!(
        Applied,
        "select version, checksum from _sqlx_migrations where success"
    )
    .fetch_all(pool)
    .await?)
}

/// The embedded migrations not among `applied`, in order.
fn pending_of(applied: &[Applied]) -> Vec<&'static Migration> {
    MIGRATOR
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .collect()
}

/// Those of `applied` newer than every migration this binary holds.
fn newer_of(applied: &[Applied]) -> Vec<i64> {
    let newest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    applied
        .iter()
        .map(|a| a.version)
        .filter(|v| *v > newest)
        .collect()
}

/// The first of `applied` whose file differs from this binary's migration of that version.
fn edited_of(applied: &[Applied]) -> Option<i64> {
    applied
        .iter()
        .find(|a| {
            MIGRATOR
                .iter()
                .any(|m| m.version == a.version && *m.checksum != *a.checksum)
        })
        .map(|a| a.version)
}

/// Number of embedded migrations the database has not applied yet.
pub async fn pending_migrations(pool: &PgPool) -> Result<usize, DbError> {
    Ok(pending_of(&applied_migrations(pool).await?).len())
}

/// Fails with [`DbError::NotMigrated`] unless every embedded migration is applied, and with
/// [`DbError::Edited`] when one was applied from a file that differs from this release's
/// (`settle migrate` refuses such a database; `api` and `worker` ran on it, on a schema they
/// do not know).
pub async fn ensure_migrated(pool: &PgPool) -> Result<(), DbError> {
    let applied = applied_migrations(pool).await?;
    if let Some(version) = edited_of(&applied) {
        return Err(DbError::Edited { version });
    }
    match pending_of(&applied).len() {
        0 => Ok(()),
        pending => Err(DbError::NotMigrated { pending }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_indexes_a_migration_builds_concurrently_are_named_from_its_statements() {
        let sql = "-- transactions_paid_bucket and id in a comment\n\
                   create index concurrently a_idx\n on t (x);\n\
                   CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"B_idx\" on t (y);";
        assert_eq!(concurrently_built(sql), ["a_idx", "B_idx"]);
        let build = MIGRATOR.iter().find(|m| m.no_tx).expect("0014");
        let names = concurrently_built(build.sql.as_str());
        assert_eq!(names, ["transactions_paid_bucket_id_idx"]);
    }
}
