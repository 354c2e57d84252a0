//! Idempotency keys: a retried request gets the stored response and creates nothing. This is
//! the storage (lock a key, look it up, store a response, prune); reading the `Idempotency-Key`
//! header and replaying a response belong to the HTTP layer (`src/http/idempotency.rs`).
//!
//! The key's row is written in the same transaction as the effect it describes. While that
//! transaction runs it holds a transaction-scoped advisory lock on the key, so a concurrent
//! duplicate is told at once that the key is in use instead of queueing behind it, and
//! a duplicate arriving after the commit finds the stored response and replays it.
//!
//! A request takes its key with [`IdempotencyKey::start`]; a transaction that executes many
//! keyed requests at once (a coalesced batch of orders, [`crate::orders::coalesce`]) takes all
//! their keys with one [`claim_all`] and stores all their responses with one [`store_all`].
//!
//! When the reply to the commit is lost, [`settled_all`] finds out what happened the same way:
//! once a key's lock is free the transaction has ended, and the key's row is there (with this
//! request) if and only if it committed.
//!
//! Only outcomes of executing the request are stored (success, unknown product, out of stock);
//! requests rejected by validation store nothing, so a corrected retry with the same key works.

use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::commit::{self, CommitError};

/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 255;

/// Pause between looks while [`settled_all`] waits for keys' locks.
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

/// A client-chosen key, scoped to the endpoint it was used on and to the token that sent it
/// ([`Self::owned_by`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    scope: String,
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
            scope: scope.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The key as one token's: another token's same key is another key (as Stripe scopes keys
    /// per account). The owner is part of the stored scope (`orders/token:7`), so rows, locks
    /// and lookups need nothing else.
    pub fn owned_by(mut self, token_id: i64) -> Self {
        self.scope = format!("{}/token:{token_id}", self.scope);
        self
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
        let claim = match claim_all(&mut tx, &[(self, request)]).await {
            Ok(mut claims) => claims.pop().expect("one claim per key"),
            Err(e) => {
                tx.rollback().await?;
                return Err(e.into());
            }
        };
        match claim {
            Claim::Execute => Ok(Begun::Execute(tx)),
            Claim::Replay(stored) => {
                tx.rollback().await?;
                Ok(Begun::Replay(stored))
            }
            Claim::Refused(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    /// After this key's transaction failed to confirm its commit: [`settled_all`] for this key
    /// alone.
    pub async fn settled(
        &self,
        pool: &PgPool,
        request: &Value,
        within: Duration,
    ) -> Option<Option<StoredResponse>> {
        settled_all(pool, &[(self, request)], within)
            .await
            .pop()
            .flatten()
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
        let record = Record {
            key: self,
            request,
            status,
            body,
        };
        store_all(tx, &[record], ttl_hours).await
    }
}

/// The transaction a request runs in: under its key when it sent one (a request seen before
/// gets [`Begun::Replay`] instead), a plain one otherwise.
pub async fn begin(
    key: Option<&IdempotencyKey>,
    pool: &PgPool,
    request: &Value,
) -> Result<Begun, IdempotencyError> {
    match key {
        Some(key) => key.start(pool, request).await,
        None => Ok(Begun::Execute(pool.begin().await?)),
    }
}

/// Stores the answer `(status, body)` under the key, when the request sent one, and commits:
/// the request's effect and its key's answer land together or not at all. A commit whose
/// reply is lost is checked on a fresh connection from `pool` ([`commit::checked`]): `Ok` if
/// it took effect, so the answer given is the one stored.
pub async fn commit(
    key: Option<&IdempotencyKey>,
    pool: &PgPool,
    mut tx: Transaction<'static, Postgres>,
    request: &Value,
    (status, body): (u16, &Value),
    ttl_hours: i64,
) -> Result<(), CommitError> {
    if let Some(key) = key {
        key.store(&mut tx, request, status, body, ttl_hours)
            .await
            .map_err(CommitError::NotCommitted)?;
    }
    commit::checked(pool, tx).await
}

/// What a transaction found when it tried to take a key ([`claim_all`]).
#[derive(Debug)]
pub enum Claim {
    /// First time: the transaction holds the key; execute the request and store its response
    /// in the same transaction.
    Execute,
    /// Seen before with the same request: answer this.
    Replay(StoredResponse),
    /// [`IdempotencyError::KeyInUse`] or [`IdempotencyError::KeyReused`].
    Refused(IdempotencyError),
}

/// A key with the request it came with.
pub type KeyedRequest<'a> = (&'a IdempotencyKey, &'a Value);

/// Locks each key for the caller's transaction, without waiting for one another transaction
/// holds, and looks up the stored responses: one [`Claim`] per key, in order.
///
/// A key with a stored response is answered by it whoever holds the key: only a holder that
/// found none executes, so a stored (unexpired) response is final, and retries of a finished
/// request, reading it side by side, do not refuse each other as in use. Expiry is read on the
/// clock, not at the transaction's start (a batch may have waited for its product's row
/// since), and a caller that did not get the key replays only a response with a minute left:
/// one about to expire may be expiring for the holder, which then executes anew. A key that
/// stands twice executes once: a transaction may take its own lock again, so only its first
/// copy executes and a later one is in use (or answered by the stored response).
pub async fn claim_all(
    tx: &mut PgConnection,
    keys: &[KeyedRequest<'_>],
) -> Result<Vec<Claim>, sqlx::Error> {
    let scopes: Vec<&str> = keys.iter().map(|(k, _)| k.scope.as_str()).collect();
    let names: Vec<&str> = keys.iter().map(|(k, _)| k.key.as_str()).collect();
    let locked = sqlx::query!(
        r#"select k.ord as "ord!",
                  pg_try_advisory_xact_lock(hashtextextended(k.scope || ':' || k.key, 0))
                      as "locked!"
           from unnest($1::text[], $2::text[]) with ordinality as k(scope, key, ord)"#,
        &scopes as &[&str],
        &names as &[&str],
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut is_locked = vec![false; keys.len()];
    for row in locked.iter().filter(|row| row.locked) {
        is_locked[position(row.ord)] = true;
    }
    let mut executing = HashSet::new();
    let mut claims: Vec<Claim> = keys
        .iter()
        .zip(is_locked)
        .map(|((key, _), locked)| {
            if locked && executing.insert((key.scope.as_str(), key.key.as_str())) {
                Claim::Execute
            } else {
                Claim::Refused(IdempotencyError::KeyInUse)
            }
        })
        .collect();
    // A statement after the one that took the locks: its snapshot sees whatever the keys'
    // previous holders committed. The requests are compared as jsonb, as stored: `1e3` sent
    // again equals the `1000` jsonb kept of it, where serde_json's float and integer differ.
    let requests: Vec<&Value> = keys.iter().map(|&(_, request)| request).collect();
    let stored = sqlx::query!(
        r#"select k.ord as "ord!", i.request = k.request as "same!", i.response_status,
                  i.response_body,
                  i.expires_at > clock_timestamp() + interval '1 minute' as "lasting!"
           from unnest($1::text[], $2::text[], $3::jsonb[])
               with ordinality as k(scope, key, request, ord)
           join idempotency_keys i on i.scope = k.scope and i.key = k.key
           where i.expires_at > clock_timestamp()"#,
        &scopes as &[&str],
        &names as &[&str],
        &requests as &[&Value],
    )
    .fetch_all(tx)
    .await?;
    for row in stored {
        let i = position(row.ord);
        if !matches!(claims[i], Claim::Execute) && !row.lasting {
            continue;
        }
        claims[i] = if row.same {
            Claim::Replay(StoredResponse {
                status: row.response_status as u16,
                body: row.response_body,
            })
        } else {
            Claim::Refused(IdempotencyError::KeyReused)
        };
    }
    Ok(claims)
}

/// The index of a row numbered by `with ordinality` (from 1).
fn position(ordinality: i64) -> usize {
    usize::try_from(ordinality - 1).expect("ordinality counts from 1")
}

/// A response to store under its key ([`store_all`]).
pub struct Record<'a> {
    pub key: &'a IdempotencyKey,
    pub request: &'a Value,
    /// The status it is answered with (an HTTP status code).
    pub status: u16,
    pub body: &'a Value,
}

/// Stores each response under its key in the caller's transaction, which must hold the keys
/// ([`claim_all`]), replacing expired ones; one statement for all of them.
pub async fn store_all(
    tx: &mut PgConnection,
    records: &[Record<'_>],
    ttl_hours: i64,
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    let scopes: Vec<&str> = records.iter().map(|r| r.key.scope.as_str()).collect();
    let names: Vec<&str> = records.iter().map(|r| r.key.key.as_str()).collect();
    let requests: Vec<Value> = records.iter().map(|r| r.request.clone()).collect();
    let statuses: Vec<i16> = records.iter().map(|r| r.status as i16).collect();
    let bodies: Vec<Value> = records.iter().map(|r| r.body.clone()).collect();
    sqlx::query!(
        "insert into idempotency_keys
             (scope, key, request, response_status, response_body, expires_at)
         select scope, key, request, status, body, now() + make_interval(hours => $6)
         from unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[], $5::jsonb[])
             as r(scope, key, request, status, body)
         on conflict (scope, key) do update
         set request = excluded.request, response_status = excluded.response_status,
             response_body = excluded.response_body, created_at = now(),
             expires_at = excluded.expires_at",
        &scopes as &[&str],
        &names as &[&str],
        &requests,
        &statuses,
        &bodies,
        ttl_hours as i32,
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// After a transaction holding `keys` failed to confirm its commit: waits (at most `within`)
/// until no transaction holds each key, then gives, per key, the stored response,
/// `Some(None)` if there is none or it answered another request (the transaction did not
/// commit), or `None` if that could not be found out in time. A lock that stays taken is
/// either the lost transaction, whose backend ends as soon as the server notices its client
/// is gone, or a concurrent retry, whose outcome is then the answer.
pub async fn settled_all(
    pool: &PgPool,
    keys: &[KeyedRequest<'_>],
    within: Duration,
) -> Vec<Option<Option<StoredResponse>>> {
    if keys.is_empty() {
        return Vec::new();
    }
    let deadline = tokio::time::Instant::now() + within;
    let mut settled: Vec<Option<Option<StoredResponse>>> = keys.iter().map(|_| None).collect();
    let mut open: Vec<usize> = (0..keys.len()).collect();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let asked: Vec<KeyedRequest<'_>> = open.iter().map(|&i| keys[i]).collect();
        let error = match tokio::time::timeout(left, look(pool, &asked)).await {
            Ok(Ok(claims)) => {
                let mut in_use = Vec::new();
                for (i, claim) in open.into_iter().zip(claims) {
                    match claim {
                        Claim::Replay(stored) => settled[i] = Some(Some(stored)),
                        Claim::Execute | Claim::Refused(IdempotencyError::KeyReused) => {
                            settled[i] = Some(None);
                        }
                        Claim::Refused(_) => in_use.push(i),
                    }
                }
                open = in_use;
                if open.is_empty() {
                    return settled;
                }
                "a key is still in use".to_owned()
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if tokio::time::Instant::now() + SETTLE_PAUSE >= deadline {
            tracing::warn!(%error, "could not find out whether a keyed request committed");
            return settled;
        }
        tokio::time::sleep(SETTLE_PAUSE).await;
    }
}

/// Takes the keys and reads their responses, then lets go of them.
async fn look(pool: &PgPool, keys: &[KeyedRequest<'_>]) -> Result<Vec<Claim>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let claims = claim_all(&mut tx, keys).await;
    // Only read: whether the rollback arrives changes nothing but when the locks are free.
    let _ = tx.rollback().await;
    claims
}

/// Keys deleted per statement, so no prune holds a long transaction.
const PRUNE_BATCH: u64 = 10_000;

/// Deletes every expired key, `PRUNE_BATCH` per short statement (one pass of 10,000 a minute
/// fell behind sustained keyed traffic above about 170 requests a second), until none is left
/// or `stop` fires (a shutdown waits for one statement at most); returns how many.
/// Expired keys are already ignored when read: this only keeps the table small.
///
/// The outer `expires_at` test is what keeps a key renewed meanwhile: when the delete reaches
/// a row another transaction has just updated (a request reusing the expired key), Postgres
/// re-checks the new version against the outer conditions only, not the subquery's.
pub async fn prune_expired(
    conn: &mut PgConnection,
    stop: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    let mut pruned = 0;
    loop {
        let batch = sqlx::query!(
            "delete from idempotency_keys
             where (scope, key) in (
                 select scope, key from idempotency_keys where expires_at <= now() limit $1
             )
             and expires_at <= now()",
            PRUNE_BATCH as i64,
        )
        .execute(&mut *conn)
        .await?
        .rows_affected();
        pruned += batch;
        if batch < PRUNE_BATCH || stop.is_cancelled() {
            return Ok(pruned);
        }
    }
}

/// Prunes expired keys every `every` until `shutdown`; run by every worker process.
pub async fn prune_periodically(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let pruned = match pool.acquire().await {
            Ok(mut conn) => prune_expired(&mut conn, &shutdown).await,
            Err(e) => Err(e),
        };
        match pruned {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "pruned expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "pruning idempotency keys failed"),
        }
    }
}
