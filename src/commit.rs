//! Committing a request's transaction so that a failed `COMMIT` can still say whether it took
//! effect.
//!
//! A `COMMIT` whose reply is lost (the connection broke, the backend was terminated while it
//! waited for a synchronous standby) may have committed or not, and its connection can no
//! longer tell. So before sending it, [`checked`] reads the transaction's id; if the commit
//! then fails, it asks a fresh connection `pg_xact_status` of that id until the transaction
//! has ended: committed, or aborted (nothing of it took effect). Until it has ended the backend
//! is either still committing or idle in a transaction whose client is gone, which the server
//! ends within its idle-in-transaction timeout; [`WAIT`] covers that.
//!
//! A server that restarted meanwhile (a crash, a failover) may have lost the commit and given
//! its transaction id to a later transaction, so there only "aborted" is believed: the outcome
//! of a "committed" id stays unknown.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};

use crate::db;

/// How long to look for a lost commit's outcome (here and for a lost order batch,
/// `orders::outcome::WAIT`). A backend whose client vanished without the server noticing holds
/// its transaction, and its locks, until the idle-in-transaction timeout ends its session, so
/// waiting a little longer than that resolves that case too.
pub const WAIT: Duration = db::IDLE_IN_TRANSACTION_TIMEOUT.saturating_add(Duration::from_secs(1));

/// Pause between looks.
const PAUSE: Duration = Duration::from_millis(50);

/// Why a transaction did not commit, or may not have.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Nothing of it took effect: it failed before its `COMMIT`, or was found aborted.
    #[error(transparent)]
    NotCommitted(sqlx::Error),
    /// The `COMMIT` failed and whether it took effect could not be found out within [`WAIT`].
    #[error("the commit's outcome is unknown: {0}")]
    Unknown(#[source] sqlx::Error),
}

/// The transaction as the server knows it, read before its `COMMIT`.
struct Marker {
    /// Its `xid8`, as text.
    xid: String,
    /// When the server that ran it started: another start means a restart or another server.
    server_started: DateTime<Utc>,
}

/// What a fresh connection sees of the transaction.
enum Seen {
    Committed,
    Aborted,
    /// Still running: committing, or idle in a transaction whose client is gone.
    Running,
    /// Past knowing: committed on a server that restarted since, or an id too old for the
    /// server to know.
    Unknowable,
}

/// Commits `tx`; if the `COMMIT` fails, finds out on a fresh connection from `pool` whether it
/// took effect: `Ok` if it did.
pub async fn checked(
    pool: &PgPool,
    mut tx: Transaction<'static, Postgres>,
) -> Result<(), CommitError> {
    let marker = sqlx::query_as!(
        Marker,
        r#"select pg_current_xact_id()::text as "xid!",
                  pg_postmaster_start_time() as "server_started!""#
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(CommitError::NotCommitted)?;
    let Err(e) = tx.commit().await else {
        return Ok(());
    };
    tracing::warn!(error = %e, xid = %marker.xid, "a commit failed; checking whether it took effect");
    match ended(pool, &marker).await {
        Seen::Committed => Ok(()),
        Seen::Aborted => Err(CommitError::NotCommitted(e)),
        Seen::Running | Seen::Unknowable => Err(CommitError::Unknown(e)),
    }
}

/// How the transaction ended, looking until it has or [`WAIT`] has passed.
async fn ended(pool: &PgPool, marker: &Marker) -> Seen {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = match tokio::time::timeout(left, look(pool, marker)).await {
            Ok(Ok(Seen::Running)) => "still in progress".to_owned(),
            Ok(Ok(seen)) => return seen,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if tokio::time::Instant::now() + PAUSE >= deadline {
            tracing::warn!(%error, "could not find out whether a commit took effect");
            return Seen::Running;
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// One look. An id at or past the snapshot's `xmax` has not ended yet as this snapshot sees
/// it: it is the newest transaction still running, or (the server restarted and lost it) one
/// not handed out again yet, which `pg_xact_status` would refuse as "in the future".
async fn look(pool: &PgPool, marker: &Marker) -> Result<Seen, sqlx::Error> {
    let row = sqlx::query!(
        r#"select pg_postmaster_start_time() = $2 as "same_server!",
                  case when $1::text::xid8 < pg_snapshot_xmax(pg_current_snapshot())
                       then pg_xact_status($1::text::xid8)
                       else 'in progress' end as status"#,
        marker.xid,
        marker.server_started,
    )
    .fetch_one(pool)
    .await?;
    Ok(match (row.status.as_deref(), row.same_server) {
        (Some("aborted"), _) => Seen::Aborted,
        (Some("committed"), true) => Seen::Committed,
        (Some("in progress"), _) => Seen::Running,
        // Committed on a server that restarted since, or too old to be known.
        _ => Seen::Unknowable,
    })
}
