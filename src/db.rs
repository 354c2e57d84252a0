//! Connecting to Postgres: creating the database when it is missing and the pool every process
//! shares; migrating, and the check that keeps `api` and `worker` off an unmigrated schema, are
//! in `db/migrate.rs`.

use std::str::FromStr;
use std::time::Duration;

use settle_workers::error::{is_session_lost, sql_state};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::config::DatabaseConfig;

mod migrate;

pub use migrate::{MIGRATOR, ensure_migrated, migrate, pending_migrations};

/// A session frozen inside a transaction (a paused process, a stalled VM) is ended by Postgres
/// after at most this long, releasing its row locks so a job it held can be reclaimed; the pool
/// of a process uses half its lease when that is shorter ([`idle_in_transaction_timeout`]), so
/// a frozen worker never pins a job past its lease.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The idle-in-transaction timeout for a process whose jobs hold `lease`.
pub fn idle_in_transaction_timeout(lease: Duration) -> Duration {
    IDLE_IN_TRANSACTION_TIMEOUT.min(lease / 2)
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url")]
    Url(#[source] sqlx::Error),
    #[error("database at {url} does not exist; run `settle migrate` to create it")]
    Missing { url: String },
    #[error("cannot connect to Postgres at {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "the database is not migrated ({pending} pending migration(s)); run `settle migrate` \
         or set database.migrate_on_start = true"
    )]
    NotMigrated { pending: usize },
    #[error(
        "migration {version} was applied to this database from a file that differs from this \
         release's: settle does not run on a schema it does not know; run the release that \
         applied it, or migrate a fresh database"
    )]
    Edited { version: i64 },
    #[error(
        "the database's encoding is {encoding}, and settle needs UTF8 (its limits count \
         characters, not bytes): let `settle migrate` create the database, or create it with \
         `create database … template template0 encoding 'UTF8' locale 'C'`"
    )]
    NotUtf8 { encoding: String },
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Parses the configured URL into connect options with settle's session settings.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, DbError> {
    connect_options_with(url, IDLE_IN_TRANSACTION_TIMEOUT)
}

/// [`connect_options`] with the given idle-in-transaction timeout.
pub fn connect_options_with(
    url: &str,
    idle_in_transaction: Duration,
) -> Result<PgConnectOptions, DbError> {
    let mut options = PgConnectOptions::from_str(url).map_err(DbError::Url)?;
    // TLS only where asked for (`sslmode` in the URL, or PGSSLMODE): libpq's default, `prefer`,
    // would encrypt every connection to a server with ssl on, and sqlx's TLS handshake costs
    // about 0.1 s per new connection (measured: 230 ms for two against 30 ms), which reconnects,
    // heartbeats and `/readyz` would pay. Before TLS was built in, every connection was plain.
    let asked = url::Url::parse(url)
        .is_ok_and(|parsed| parsed.query_pairs().any(|(key, _)| key == "sslmode"))
        || std::env::var_os("PGSSLMODE").is_some();
    if !asked {
        options = options.ssl_mode(sqlx::postgres::PgSslMode::Disable);
    }
    let idle_ms = idle_in_transaction.as_millis().max(1).to_string();
    Ok(options
        .application_name("settle")
        .options([("idle_in_transaction_session_timeout", idle_ms.as_str())])
        .log_statements(tracing::log::LevelFilter::Trace)
        // Settlement batches legitimately run for seconds under load; warn only past 30 s.
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(30)))
}

/// What a pool's `PoolTimedOut` hides: the pool retries a refused connection until its acquire
/// timeout and then says only that it timed out. One direct try names the cause (refused, no
/// such role, …), or is `PoolTimedOut` again when it too gets no answer within `limit` (a
/// server that accepts and never answers would hold it forever).
pub async fn why_timed_out(options: &PgConnectOptions, limit: Duration) -> sqlx::Error {
    match tokio::time::timeout(limit, PgConnection::connect_with(options)).await {
        Ok(Err(cause)) => cause,
        Ok(Ok(_)) | Err(_) => sqlx::Error::PoolTimedOut,
    }
}

/// Opens the pool for `config`, failing fast with the URL (without password) if unreachable.
/// Sessions frozen inside a transaction are ended after `idle_in_transaction`.
pub async fn connect(
    config: &DatabaseConfig,
    idle_in_transaction: Duration,
) -> Result<PgPool, DbError> {
    let options = connect_options_with(&config.url, idle_in_transaction)?;
    let source = match PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
        .connect_with(options.clone())
        .await
    {
        Ok(pool) => return Ok(pool),
        Err(sqlx::Error::PoolTimedOut) => {
            why_timed_out(&options, Duration::from_millis(config.acquire_timeout_ms)).await
        }
        Err(e) => e,
    };
    Err(match &source {
        sqlx::Error::Database(e) if e.code().as_deref() == Some("3D000") => DbError::Missing {
            url: redact(&config.url),
        },
        _ => DbError::Connect {
            url: redact(&config.url),
            source,
        },
    })
}

/// The database `url` names, and a connection to the same server's `postgres` database from
/// which to create or drop it; `None` when the URL names no database.
async fn maintenance_connection(url: &str) -> Result<Option<(String, PgConnection)>, DbError> {
    let target = connect_options(url)?;
    let Some(name) = target.get_database().map(str::to_owned) else {
        return Ok(None);
    };
    let maintenance = target.database("postgres");
    let conn = PgConnection::connect_with(&maintenance)
        .await
        .map_err(|source| DbError::Connect {
            url: redact(url),
            source,
        })?;
    Ok(Some((name, conn)))
}

/// Creates the configured database if it does not exist (needs a role that may create one).
pub async fn create_database_if_missing(url: &str) -> Result<bool, DbError> {
    // The database itself first: a role that may not connect to `postgres` (as on many managed
    // servers) still migrates and serves a database that exists.
    match PgConnection::connect_with(&connect_options(url)?).await {
        Ok(conn) => {
            let _ = conn.close().await;
            return Ok(false);
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
        Err(source) => {
            return Err(DbError::Connect {
                url: redact(url),
                source,
            });
        }
    }
    let Some((name, mut conn)) = maintenance_connection(url).await? else {
        return Ok(false);
    };
    let exists = sqlx::query_scalar!(
        r#"select exists (select 1 from pg_database where datname = $1) as "exists!""#,
        name
    )
    .fetch_one(&mut conn)
    .await?;
    if exists {
        return Ok(false);
    }
    let quoted = quote_ident(&name);
    // A cluster made without a UTF-8 locale (initdb under LANG=C makes SQL_ASCII) would give
    // the new database its encoding; settle's limits count characters, so ask for UTF8 there
    // (from template0, the only template that may change encoding, with the C locale, the
    // only one that fits every encoding).
    let template_utf8 = sqlx::query_scalar!(
        r#"select pg_encoding_to_char(encoding) = 'UTF8' as "utf8!"
             from pg_database where datname = 'template1'"#
    )
    .fetch_optional(&mut conn)
    .await?
    .unwrap_or(false);
    let options = if template_utf8 {
        ""
    } else {
        " template template0 encoding 'UTF8' locale 'C'"
    };
    // Dynamic: the database name comes from the URL, and CREATE DATABASE takes no parameters.
    match sqlx::query(sqlx::AssertSqlSafe(format!(
        "create database {quoted}{options}"
    )))
    .execute(&mut conn)
    .await
    {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if created_by_another(e.as_ref()) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether CREATE DATABASE failed because another process created the same database between
/// our check and our create: 42P04 when its creation had committed before ours began, or, when
/// the two overlapped, 23505 on `pg_database`'s unique index on names (ours waited on its row
/// there and lost once it committed). Two `migrate_on_start` processes starting at once meet
/// the second as often as the first.
fn created_by_another(e: &dyn sqlx::error::DatabaseError) -> bool {
    match e.code().as_deref() {
        Some("42P04") => true,
        Some("23505") => e.constraint() == Some("pg_database_datname_index"),
        _ => false,
    }
}

/// Drops the database `url` names, if it exists, ending its sessions first (`with (force)`).
pub async fn drop_database_if_exists(url: &str) -> Result<(), DbError> {
    let Some((name, mut conn)) = maintenance_connection(url).await? else {
        return Ok(());
    };
    let quoted = quote_ident(&name);
    // Dynamic: the database name comes from the URL (quoted above); DROP DATABASE takes no
    // parameters.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {quoted} with (force)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Fails with [`DbError::NotUtf8`] unless the database stores text as UTF-8: under another
/// encoding (SQL_ASCII counts bytes) a name within the API's limit in characters would break
/// the tables' limits, and a 500 would answer a valid request.
pub async fn ensure_utf8(pool: &PgPool) -> Result<(), DbError> {
    let encoding = sqlx::query_scalar!(
        r#"select pg_encoding_to_char(encoding)::text as "encoding!"
             from pg_database where datname = current_database()"#
    )
    .fetch_one(pool)
    .await?;
    match encoding.as_str() {
        "UTF8" => Ok(()),
        _ => Err(DbError::NotUtf8 { encoding }),
    }
}

/// Whether `e` means the connection or the server failed, rather than the statement being
/// refused: the session is gone or going (as the queue's transient errors, plus every `57P…`
/// shutdown and termination and too many connections), so the request may succeed on a fresh
/// connection and is answered 503, never 500.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    is_session_lost(e)
        || sql_state(e).is_some_and(|code| code.starts_with("57P") || code == "53300")
}

/// `name` as a quoted SQL identifier, for the statements that take no parameters (CREATE and
/// DROP DATABASE).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The URL with any password (in its user part or its query) replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let secret = |key: &str| matches!(key, "password" | "sslpassword");
    // The driver also takes a password as a query parameter (`?password=`).
    let in_query = parsed.query_pairs().any(|(key, _)| secret(&key));
    if parsed.password().is_none() && !in_query {
        return url.to_owned();
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if in_query {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if secret(&key) { "***".into() } else { value };
                (key.into_owned(), value.into_owned())
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_password_is_hidden_wherever_the_url_holds_it() {
        let hidden = [
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            (
                "postgres://u@h/db?password=pw&sslmode=disable",
                "postgres://u@h/db?password=***&sslmode=disable",
            ),
            (
                "postgres://u:pw@h/db?sslpassword=key",
                "postgres://u:***@h/db?sslpassword=***",
            ),
            // Nothing to hide: the URL as given.
            (
                "postgres://u@h/db?sslmode=require",
                "postgres://u@h/db?sslmode=require",
            ),
            ("not a url", "not a url"),
        ];
        for (url, shown) in hidden {
            assert_eq!(redact(url), shown, "{url}");
        }
    }
}
