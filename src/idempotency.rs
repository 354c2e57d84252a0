//! Idempotency keys: a retried request gets the stored response and creates nothing. This is
//! the storage (lock a key, look it up, store a response, prune); reading the `Idempotency-Key`
//! header and replaying a response belong to the HTTP layer (`src/http/idempotency.rs`).
//!
//! The key's row is written in the same transaction as the effect it describes. While that
//! transaction runs it holds a transaction-scoped advisory lock on the key, so a concurrent
//! duplicate is told at once that the key is in use instead of queueing behind it, and
//! a duplicate arriving after the commit finds the stored response and replays it.
//!
//! When the reply to the commit is lost, [`IdempotencyKey::settled`] finds out what happened the
//! same way: once the key's lock is free the transaction has ended, and the key's row is there
//! if and only if it committed.
//!
//! Only outcomes of executing the request are stored (success, unknown product, out of stock);
//! requests rejected by validation store nothing, so a corrected retry with the same key works.

use serde_json::Value;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 255;

/// Pause between looks while [`IdempotencyKey::settled`] waits for a key's lock.
const SETTLE_PAUSE: Duration = Duration::from_millis(50);

/// Why a keyed request cannot go ahead.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// The key is not 1 to [`MAX_KEY_CHARS`] visible ASCII characters.
    #[error("Idempotency-Key must be 1 to {MAX_KEY_CHARS} visible ASCII characters")]
    InvalidKey,
    /// Another transaction holds the key: a request with it is in flight.
    #[error("the key is held by a request in flight")]
    KeyInUse,
    /// The key's stored response answered a different request.
    #[error("the key was stored with a different request")]
    KeyReused,
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// A client-chosen key, scoped to the endpoint it was used on.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    scope: &'static str,
    key: String,
}

/// The outcome of [`IdempotencyKey::start`].
pub enum Begun {
    /// First time: execute in this transaction, which holds the key's lock.
    Execute(Transaction<'static, Postgres>),
    /// Seen before with the same request.
    Replay(StoredResponse),
}

/// A response to replay verbatim.
#[derive(Debug)]
pub struct StoredResponse {
    /// The status it was answered with (an HTTP status code, as stored).
    pub status: u16,
    pub body: Value,
}

impl IdempotencyKey {
    /// Takes `key` (surrounding white space trimmed) if it is 1 to [`MAX_KEY_CHARS`] visible
    /// ASCII characters.
    pub fn parse(scope: &'static str, key: &str) -> Result<Self, IdempotencyError> {
        let key = key.trim();
        if key.is_empty() || key.len() > MAX_KEY_CHARS || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(IdempotencyError::InvalidKey);
        }
        Ok(Self {
            scope,
            key: key.to_owned(),
        })
    }

    /// Opens the request's transaction and locks the key in it. [`Begun::Execute`]: run the
    /// request in that transaction, [`Self::store`] its response, commit. [`Begun::Replay`]:
    /// answer with the stored response.
    ///
    /// On a replay or a refusal the transaction is rolled back here, explicitly: a dropped
    /// sqlx transaction keeps the key's lock until its connection is next used, so a retry
    /// right after would be told the key is in use.
    pub async fn start(&self, pool: &PgPool, request: &Value) -> Result<Begun, IdempotencyError> {
        let mut tx = pool.begin().await?;
        match self.begin(&mut tx, request).await {
            Ok(None) => Ok(Begun::Execute(tx)),
            Ok(Some(stored)) => {
                tx.rollback().await?;
                Ok(Begun::Replay(stored))
            }
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    /// After this key's transaction failed to confirm its commit: waits (at most `within`)
    /// until no transaction holds the key, then returns the stored response, `Some(None)` if
    /// there is none (the transaction did not commit), or `None` if that could not be found
    /// out in time. A lock that stays taken is either the lost transaction, whose backend
    /// ends as soon as the server notices its client is gone, or a concurrent retry, whose
    /// outcome is then the answer.
    pub async fn settled(
        &self,
        pool: &PgPool,
        request: &Value,
        within: Duration,
    ) -> Option<Option<StoredResponse>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let error = match tokio::time::timeout(left, self.start(pool, request)).await {
                Ok(Ok(Begun::Replay(stored))) => return Some(Some(stored)),
                Ok(Ok(Begun::Execute(tx))) => {
                    // Nothing stored: the lost transaction aborted. Release the lock.
                    let _ = tx.rollback().await;
                    return Some(None);
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_owned(),
            };
            if tokio::time::Instant::now() + SETTLE_PAUSE >= deadline {
                tracing::warn!(%error, "could not find out whether a keyed request committed");
                return None;
            }
            tokio::time::sleep(SETTLE_PAUSE).await;
        }
    }

    /// Locks the key for this transaction and looks for a stored response.
    ///
    /// `Ok(Some(_))`: replay it. `Ok(None)`: execute the request, then [`Self::store`].
    async fn begin(
        &self,
        tx: &mut PgConnection,
        request: &Value,
    ) -> Result<Option<StoredResponse>, IdempotencyError> {
        let locked = sqlx::query_scalar!(
            r#"select pg_try_advisory_xact_lock(hashtextextended($1::text || ':' || $2::text, 0))
                   as "locked!""#,
            self.scope,
            self.key,
        )
        .fetch_one(&mut *tx)
        .await?;
        if !locked {
            return Err(IdempotencyError::KeyInUse);
        }
        let stored = sqlx::query!(
            "select request, response_status, response_body from idempotency_keys
             where scope = $1 and key = $2 and expires_at > now()",
            self.scope,
            self.key,
        )
        .fetch_optional(&mut *tx)
        .await?;
        match stored {
            None => Ok(None),
            Some(stored) if &stored.request != request => Err(IdempotencyError::KeyReused),
            Some(stored) => Ok(Some(StoredResponse {
                status: stored.response_status as u16,
                body: stored.response_body,
            })),
        }
    }

    /// Stores the response in the caller's transaction (replacing an expired one).
    pub async fn store(
        &self,
        tx: &mut PgConnection,
        request: &Value,
        status: u16,
        body: &Value,
        ttl_hours: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "insert into idempotency_keys
                 (scope, key, request, response_status, response_body, expires_at)
             values ($1, $2, $3, $4, $5, now() + make_interval(hours => $6))
             on conflict (scope, key) do update
             set request = excluded.request, response_status = excluded.response_status,
                 response_body = excluded.response_body, created_at = now(),
                 expires_at = excluded.expires_at",
            self.scope,
            self.key,
            request,
            status as i16,
            body,
            ttl_hours as i32,
        )
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// Deletes up to 10,000 expired keys (one short statement, however many expired); returns how
/// many. Expired keys are already ignored when read: this only keeps the table small.
pub async fn prune_expired(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let pruned = sqlx::query!(
        "delete from idempotency_keys where (scope, key) in (
             select scope, key from idempotency_keys where expires_at <= now() limit 10000
         )",
    )
    .execute(conn)
    .await?;
    Ok(pruned.rows_affected())
}

/// Prunes expired keys every `every` until `shutdown`; run by every worker process.
pub async fn prune_periodically(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let pruned = match pool.acquire().await {
            Ok(mut conn) => prune_expired(&mut conn).await,
            Err(e) => Err(e),
        };
        match pruned {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "pruned expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "pruning idempotency keys failed"),
        }
    }
}
