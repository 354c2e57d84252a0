//! After a lost commit reply: finding out which orders of a batch were placed.
//!
//! When the reply to a batch's `COMMIT` is lost (the connection broke during or after it), the
//! transaction may have committed or not, and its connection can no longer say. Two facts settle
//! it without any extra work while nothing fails:
//! - every order is known before the commit: the insert returns its row, so "was order N
//!   placed" is "does order N exist, as the batch wrote it". The whole row is compared, not the
//!   id alone: a sequence hands an id out once only while the server stays up, and after a
//!   crash that lost the commit it hands the batch's ids out again, to other orders;
//! - a batch holds its product's row lock from its first statement to its end, and a lock is
//!   released only after the transaction's outcome is visible to others, so once a fresh
//!   connection is granted that lock the batch has committed or aborted, and the next statement
//!   sees its orders if it committed.
//!
//! A keyed order's answer is its key's: once no transaction holds the key, its stored answer
//! is there if and only if the batch committed ([`crate::idempotency::settled_all`]).
//!
//! If that cannot be done within [`WAIT`] (the database is unreachable, or the batch's backend
//! still holds the lock because the server has not noticed its client is gone), the outcome
//! stays unknown and the buyers are told so.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::batch::{Decision, KeyAnswers};
use super::coalesce::{Answer, CoalesceError, Pending};
use super::{Order, Rejected, store};
use crate::idempotency::{self, KeyedRequest};

/// How long to look for the outcome: as long as for any lost commit ([`crate::commit::WAIT`]).
pub const WAIT: Duration = crate::commit::WAIT;

/// Pause between attempts when the check's own connection fails.
const PAUSE: Duration = Duration::from_millis(50);

/// The answers of a batch whose commit failed: the stored orders and keys' answers if it
/// committed, "not placed" if not, "unknown" if that cannot be found out. An unkeyed order's
/// `OUT_OF_STOCK` stands only if the batch committed or granted nothing: it was computed after
/// the batch's grants, which an aborted batch never made.
pub(super) async fn settle_lost_commit(
    pool: &PgPool,
    product_id: i64,
    batch: &[Pending],
    decided: Vec<Decision>,
    settled: KeyAnswers,
) -> Vec<Result<Answer, CoalesceError>> {
    let keyed: Vec<KeyedRequest<'_>> = batch
        .iter()
        .zip(&decided)
        .filter_map(|(pending, decision)| match (&pending.key, decision) {
            (Some(keyed), Decision::Keyed { .. }) => Some((&keyed.key, &keyed.request)),
            _ => None,
        })
        .collect();
    let (mut found, keys) = tokio::join!(
        find_orders(pool, product_id, &decided),
        idempotency::settled_all(pool, &keyed, WAIT),
    );
    let mut keys = keys.into_iter();
    decided
        .into_iter()
        .zip(settled)
        .map(|(decision, settled)| match decision {
            Decision::Plain(decided) => found.answer(decided),
            Decision::Keyed { order, .. } => match keys.next().flatten() {
                Some(Some(response)) => Ok(Answer::Stored(response)),
                Some(None) => Err(CoalesceError::NotPlaced),
                None => Err(CoalesceError::OutcomeUnknown {
                    order_id: order.map(|order| order.id),
                }),
            },
            Decision::Settled => Ok(settled.expect("a settled order has its key's answer")),
        })
        .collect()
}

/// What the check found of a batch's unkeyed orders after a lost commit.
enum Found {
    /// Nothing to look for: the batch granted nothing, or has no unkeyed order to answer.
    Nothing,
    /// Whether the batch committed, and those of its granted orders that exist as it wrote
    /// them.
    Orders {
        committed: bool,
        stored: HashMap<i64, Order>,
    },
    /// The check failed.
    Unknown,
}

impl Found {
    /// An unkeyed order's answer, given what was found.
    fn answer(&mut self, decided: Result<Order, Rejected>) -> Result<Answer, CoalesceError> {
        match (self, decided) {
            (Self::Nothing, decided) => Ok(Answer::Decided(decided)),
            (Self::Orders { stored, .. }, Ok(order)) => stored
                .remove(&order.id)
                .map(|order| Answer::Decided(Ok(order)))
                .ok_or(CoalesceError::NotPlaced),
            (
                Self::Orders {
                    committed: true, ..
                },
                Err(rejected),
            ) => Ok(Answer::Decided(Err(rejected))),
            (Self::Unknown, Ok(order)) => Err(CoalesceError::OutcomeUnknown {
                order_id: Some(order.id),
            }),
            (Self::Orders { .. } | Self::Unknown, Err(_)) => Err(CoalesceError::NotPlaced),
        }
    }
}

/// Looks for the batch's granted orders (keyed ones included: any of them tells whether it
/// committed) if it has unkeyed orders to answer.
async fn find_orders(pool: &PgPool, product_id: i64, decided: &[Decision]) -> Found {
    let granted: HashMap<i64, &Order> = decided
        .iter()
        .filter_map(|decision| match decision {
            Decision::Plain(Ok(order)) => Some(order),
            Decision::Keyed { order, .. } => order.as_ref(),
            _ => None,
        })
        .map(|order| (order.id, order))
        .collect();
    if granted.is_empty() || !decided.iter().any(|d| matches!(d, Decision::Plain(_))) {
        return Found::Nothing;
    }
    let ids: Vec<i64> = granted.keys().copied().collect();
    match placed(pool, product_id, &ids).await {
        Some(found) => {
            let stored = as_written(&granted, found);
            Found::Orders {
                committed: !stored.is_empty(),
                stored,
            }
        }
        None => Found::Unknown,
    }
}

/// The rows `found` under the batch's order ids that are the orders it wrote: one with the
/// same id and anything else different is another order that got the id after a crash.
fn as_written(granted: &HashMap<i64, &Order>, found: Vec<Order>) -> HashMap<i64, Order> {
    found
        .into_iter()
        .filter(|row| granted.get(&row.id) == Some(&row))
        .map(|row| (row.id, row))
        .collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: i64, buyer: &str) -> Order {
        Order {
            id,
            product_id: 1,
            buyer_id: buyer.into(),
            quantity: 1,
            unit_price_cents: 100,
            total_cents: 100,
            created_at: "2025-01-01T00:00:00Z".parse().unwrap(),
        }
    }

    #[test]
    fn an_id_another_order_got_after_a_crash_is_not_the_batchs() {
        let (ours, theirs) = (order(7, "b-1"), order(8, "b-2"));
        let granted = HashMap::from([(7, &ours), (8, &theirs)]);
        let found = vec![order(7, "b-1"), order(8, "someone-else")];
        let stored = as_written(&granted, found);
        assert_eq!(stored.keys().collect::<Vec<_>>(), [&7]);
    }
}
