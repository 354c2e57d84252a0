//! After a lost commit reply: finding out which orders of a batch were placed.
//!
//! When the reply to a batch's `COMMIT` is lost (the connection broke during or after it), the
//! transaction may have committed or not, and its connection can no longer say. Two facts settle
//! it without any extra work while nothing fails:
//! - every order's id is known before the commit: the insert returns it, drawn from a sequence
//!   that never hands out an id twice, so "was order N placed" is "does order N exist";
//! - a batch holds its product's row lock from its first statement to its end, and a lock is
//!   released only after the transaction's outcome is visible to others, so once a fresh
//!   connection is granted that lock the batch has committed or aborted, and the next statement
//!   sees its orders if it committed.
//!
//! If that cannot be done within [`WAIT`] (the database is unreachable, or the batch's backend
//! still holds the lock because the server has not noticed its client is gone), the outcome
//! stays unknown and the buyers are told so.

use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::{Order, store};
use crate::db;

/// How long to look for the outcome. A backend whose client vanished without the server
/// noticing holds its locks until the idle-in-transaction timeout ends its session, so waiting
/// a little longer than that resolves that case too.
pub const WAIT: Duration = db::IDLE_IN_TRANSACTION_TIMEOUT.saturating_add(Duration::from_secs(1));

/// Pause between attempts when the check's own connection fails.
const PAUSE: Duration = Duration::from_millis(50);

/// The orders among `ids` (all written by one transaction that held `product_id`'s row lock)
/// that exist once that transaction has certainly ended; `None` if that could not be found out
/// within [`WAIT`].
pub async fn placed(pool: &PgPool, product_id: i64, ids: &[i64]) -> Option<Vec<Order>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let error =
            match tokio::time::timeout(left, read_after_lock(pool, product_id, ids, left)).await {
                Ok(Ok(orders)) => return Some(orders),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_owned(),
            };
        if Instant::now() + PAUSE >= deadline {
            tracing::warn!(product_id, %error, "could not find out which orders were placed");
            return None;
        }
        tracing::debug!(product_id, %error, "checking which orders were placed; retrying");
        tokio::time::sleep(PAUSE).await;
    }
}

async fn read_after_lock(
    pool: &PgPool,
    product_id: i64,
    ids: &[i64],
    lock_timeout: Duration,
) -> Result<Vec<Order>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    store::wait_product_unlocked(&mut tx, product_id, lock_timeout).await?;
    let orders = store::get_orders(&mut tx, ids).await?;
    // What was read is settled: a failure to end this read-only transaction changes nothing.
    let _ = tx.commit().await;
    Ok(orders)
}
