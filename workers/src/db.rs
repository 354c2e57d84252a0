//! How the runtime runs its statements: each on a connection taken from a pool for just that
//! statement, and the writes that must land (an attempt's ending, a batch of completions)
//! retried through transient errors until a deadline, past which the job's lease has expired,
//! another worker may hold it, and the fenced write would match nothing anyway.

use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::error::is_transient;

/// The pause before a write that failed with a transient error is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Runs `statement` on a connection from `pool`, handed back when it is done. Failing to get a
/// connection is the statement's error: every caller handles the two alike.
pub(crate) async fn on_conn<T>(
    pool: &PgPool,
    statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
) -> Result<T, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    statement(&mut conn).await
}

/// Runs `statement` on a connection of `pool`, giving up after `limit` (the connection is then
/// closed, not handed back mid-statement): a connection gone silent must not hold a claim
/// lane, or the gate both lanes and the sweeper share, for as long as TCP takes to notice.
pub(crate) async fn within<T>(
    pool: &PgPool,
    limit: Duration,
    statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
) -> Result<T, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    match tokio::time::timeout(limit, statement(&mut conn)).await {
        Ok(done) => done,
        Err(_) => {
            conn.close_on_drop();
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply within {limit:?}"),
            )))
        }
    }
}

/// Runs `attempt` (typically an [`on_conn`] statement), and again after [`RETRY_PAUSE`] each
/// time it fails with a transient error, until `deadline` passes or `abandon` fires; `retrying`
/// logs each retry. Returns the first success, or the error that ended the tries.
pub(crate) async fn retry_until<T, F>(
    deadline: Instant,
    abandon: Option<&CancellationToken>,
    mut attempt: impl FnMut() -> F,
    mut retrying: impl FnMut(&sqlx::Error),
) -> Result<T, sqlx::Error>
where
    F: Future<Output = Result<T, sqlx::Error>>,
{
    loop {
        let result = attempt().await;
        let error = match &result {
            Err(e) if is_transient(e) && Instant::now() < deadline => e,
            _ => return result,
        };
        if abandon.is_some_and(CancellationToken::is_cancelled) {
            return result;
        }
        retrying(error);
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}
