//! Coalescing: concurrent orders of a product placed by one transaction.
//!
//! On a hot product every order commits on the same row, so throughput is bounded by commit
//! latency (one WAL flush each) and by the lock convoy of the buyers queued on that row: at 64
//! clients Postgres spends its time waking waiters that then queue again. Here each product
//! has one task per API process that takes every order waiting for it, locks the row once,
//! grants orders first-come-first-served while stock lasts, writes the grants and the single
//! stock decrement, and commits once for all of them. Every buyer still gets exactly the answer
//! the single statement would give: an order, or `OUT_OF_STOCK` with what was left.
//!
//! Orders with an `Idempotency-Key` ride the same batches (`super::batch`): the batch's
//! transaction takes their keys (a key in use or reused is refused, a stored answer replayed,
//! as [`crate::idempotency`] does for a single request) and stores each decided order's answer
//! under its key before the one commit, so a key's answer exists if and only if its order's
//! fate committed.
//!
//! The no-oversell guarantee does not depend on this module: the decrement is computed under
//! the row lock in the same transaction as the inserts, and `stock_not_negative` still stands.
//!
//! A batch that runs past its deadline (`orders.batch_timeout_ms`) is ended there: its
//! connection is closed, and it is answered as not placed if its commit was not yet sent, else
//! checked as a lost commit (below). A connection gone silent without closing (a network
//! partition) would otherwise hold the product's task, and every order queued behind it,
//! until TCP gave up.
//!
//! No buyer is told "failed" for an order that exists. A batch whose statements fail placed
//! nothing and stored no key, and its buyers are told so. A batch whose commit fails may have
//! committed anyway (the reply can be lost after the commit): [`super::outcome`] then finds out
//! on a fresh connection which of its orders exist and which of its keys were stored, so each
//! buyer gets the stored answer, "not placed", or, only if that check fails too, "outcome
//! unknown" with the id the order has if it was placed.
//!
//! Each order is counted (`settle_orders_total`) as its batch answers it, heard or not: an order
//! placed after its request timed out or its client hung up is counted placed; one abandoned
//! while queued is dropped undecided, and counted an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::batch::KeyAnswers;
use super::{NewOrder, Order, Rejected, batch, outcome};
use crate::config::OrdersConfig;
use crate::idempotency::{IdempotencyError, IdempotencyKey, StoredResponse};
use crate::metrics::{OrderCount, OrderOutcome};

/// A product's task ends after this long without orders, freeing its slot.
const IDLE: Duration = Duration::from_secs(5);

/// What a buyer is told.
#[derive(Debug)]
pub enum Answer {
    /// An order without a key: placed, or why not.
    Decided(Result<Order, Rejected>),
    /// A keyed order's answer, decided by its batch and stored under its key.
    Stored(StoredResponse),
    /// The answer an earlier request with the same key and body stored.
    Replay(StoredResponse),
    /// The key is held by a request in flight, or was stored with another request.
    Refused(IdempotencyError),
}

/// A keyed order's key, and the request its answer is stored with.
#[derive(Debug)]
pub struct Keyed {
    pub key: IdempotencyKey,
    pub request: Value,
}

/// How a keyed order's answer is stored under its key.
#[derive(Debug, Clone, Copy)]
pub struct KeyStore {
    /// The response a decision is answered with (the HTTP layer's rendering): stored as it
    /// is answered, so a replay is the first answer exactly.
    pub render: fn(&Result<Order, Rejected>) -> serde_json::Result<StoredResponse>,
    /// How long a stored answer is replayed (`idempotency.ttl_hours`).
    pub ttl_hours: i64,
}

/// One order waiting for its product's next batch.
pub(super) struct Pending {
    pub(super) order: NewOrder,
    pub(super) key: Option<Keyed>,
    reply: oneshot::Sender<Result<Answer, CoalesceError>>,
    /// The order's count, shared with its request: taken by its batch, whether or not the
    /// request is still there for the answer.
    count: OrderCount,
}

/// How big a product's batches get and how long one may take.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Most orders one batch places (`orders.max_batch`).
    max_batch: usize,
    /// How long a batch may take from its first statement to its commit's reply
    /// (`orders.batch_timeout_ms`). Past it, the batch's connection is taken for lost: a
    /// network partition that no socket notices would otherwise stall the product's orders
    /// until TCP gives up, which can be hours.
    timeout: Duration,
}

/// Routes each order to its product's task, starting the task on first use.
#[derive(Clone)]
pub struct Coalescer {
    pool: PgPool,
    limits: Limits,
    keys: KeyStore,
    products: Products,
}

/// Each product's task, by the sender of its queue; a task that ends removes itself.
type Products = Arc<Mutex<HashMap<i64, mpsc::UnboundedSender<Pending>>>>;

/// Removes `product_id`'s entry if its task has ended (its queue is closed), not one a later
/// task has put there meanwhile.
fn remove_ended(products: &Products, product_id: i64) {
    let mut products = products.lock().expect("coalescer map poisoned");
    if products
        .get(&product_id)
        .is_some_and(mpsc::UnboundedSender::is_closed)
    {
        products.remove(&product_id);
    }
}

/// Why a coalesced order has no answer from the database.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoalesceError {
    /// A statement of the batch failed before its commit: nothing of it was placed or stored.
    #[error(transparent)]
    Sql(Arc<sqlx::Error>),
    /// The batch ended without placing this order: it ran past `orders.batch_timeout_ms`
    /// before its commit was sent, or its commit failed and the check found the order absent.
    #[error("the batch did not commit and the order was not placed")]
    NotPlaced,
    /// The batch's commit reply was lost and the check could not tell whether it took effect;
    /// `order_id` is the order's id if it did (`None` for an order the batch did not grant).
    #[error("the batch's commit reply was lost; whether it took effect is unknown")]
    OutcomeUnknown { order_id: Option<i64> },
    #[error("the product's order task stopped before answering")]
    Dropped,
}

impl Coalescer {
    pub fn new(pool: PgPool, config: &OrdersConfig, keys: KeyStore) -> Self {
        Self {
            pool,
            limits: Limits {
                max_batch: config.max_batch,
                timeout: Duration::from_millis(config.batch_timeout_ms),
            },
            keys,
            products: Arc::default(),
        }
    }

    /// Places `order` (under `key`, if it has one) together with whatever other orders for
    /// its product are waiting; its batch takes `count` as it answers.
    pub async fn place(
        &self,
        order: NewOrder,
        key: Option<Keyed>,
        count: OrderCount,
    ) -> Result<Answer, CoalesceError> {
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending {
            order,
            key,
            reply,
            count,
        };
        loop {
            let sender = self.sender(pending.order.product_id);
            match sender.send(pending) {
                Ok(()) => break,
                // The task ended (idle) between lookup and send: forget it and start another.
                Err(mpsc::error::SendError(returned)) => {
                    pending = returned;
                    remove_ended(&self.products, pending.order.product_id);
                }
            }
        }
        answer.await.map_err(|_| CoalesceError::Dropped)?
    }

    fn sender(&self, product_id: i64) -> mpsc::UnboundedSender<Pending> {
        let mut products = self.products.lock().expect("coalescer map poisoned");
        products
            .entry(product_id)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run_product(
                    self.pool.clone(),
                    product_id,
                    self.products.clone(),
                    rx,
                    self.limits,
                    self.keys,
                ));
                tx
            })
            .clone()
    }
}

/// One product's loop: wait for an order, take every order already queued behind it (up to
/// `max_batch`), place them in one transaction, answer each buyer, repeat.
async fn run_product(
    pool: PgPool,
    product_id: i64,
    products: Products,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    limits: Limits,
    keys: KeyStore,
) {
    // Grown as orders come (`recv_many` reserves for them), not sized for the largest batch up
    // front: every product id ordered, unknown ones too, has a task for a while.
    let mut batch = Vec::new();
    loop {
        match tokio::time::timeout(IDLE, queue.recv_many(&mut batch, limits.max_batch)).await {
            Ok(0) | Err(_) => {
                // Idle or every sender gone: close so late senders see the send fail and
                // start a fresh task, then answer anything that slipped in meanwhile. The
                // entry goes too: one per product id ever ordered (unknown ids included)
                // would otherwise stay for the life of the process.
                queue.close();
                remove_ended(&products, product_id);
                while let Ok(pending) = queue.try_recv() {
                    batch.push(pending);
                }
                if !batch.is_empty() {
                    place_batch(&pool, product_id, limits, keys, std::mem::take(&mut batch)).await;
                }
                return;
            }
            Ok(_) => place_batch(&pool, product_id, limits, keys, std::mem::take(&mut batch)).await,
        }
    }
}

async fn place_batch(
    pool: &PgPool,
    product_id: i64,
    limits: Limits,
    keys: KeyStore,
    mut batch: Vec<Pending>,
) {
    // A buyer whose request was abandoned while queued (timed out, disconnected) gets no order:
    // nobody would learn it was placed. Dropped uncounted, it is counted an error.
    batch.retain(|pending| !pending.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let answers = place_all(pool, product_id, limits.timeout, keys, &batch).await;
    let decided = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(Answer::Decided(_) | Answer::Stored(_))))
        .count();
    if decided > 0 {
        crate::metrics::order_batch(decided);
    }
    for (pending, answer) in batch.into_iter().zip(answers) {
        // Counted here, where the order's fate is known: its request may be gone (timed out,
        // its client hung up) and the order placed all the same.
        pending.count.count(counted_as(&answer));
        let _ = pending.reply.send(answer);
    }
}

/// How an order's answer is counted; `None` for an answer from its key alone that is another
/// request's order (a replay, a key in use).
fn counted_as(answer: &Result<Answer, CoalesceError>) -> Option<OrderOutcome> {
    Some(match answer {
        Ok(Answer::Decided(Ok(_))) => OrderOutcome::Placed,
        Ok(Answer::Decided(Err(Rejected::OutOfStock { .. }))) => OrderOutcome::OutOfStock,
        Ok(Answer::Decided(Err(Rejected::UnknownProduct))) => OrderOutcome::Rejected,
        Ok(Answer::Stored(stored)) => OrderOutcome::of_answer(stored.status),
        Ok(Answer::Replay(_) | Answer::Refused(IdempotencyError::KeyInUse)) => return None,
        Ok(Answer::Refused(_)) => OrderOutcome::Rejected,
        Err(_) => OrderOutcome::Error,
    })
}

/// How a batch that did not commit ended.
enum Ended {
    /// A statement failed; the transaction was rolled back.
    Failed(sqlx::Error),
    /// The deadline passed before the commit was sent.
    TimedOut,
    /// The commit was sent and its reply did not come (an error, or the deadline).
    CommitLost(Vec<batch::Decision>, KeyAnswers, String),
}

/// The answers of a batch that committed nothing. What a key gives stands (an earlier
/// request's answer, a key in use or reused: "not placed" would be untrue of an order an
/// earlier request placed, or one a request in flight is placing) and every other order gets
/// `unplaced`. Where the batch did not take its keys, they are read now, within `timeout`; a
/// key in use then may be held by another request placing the order or by the batch's own
/// backend until the server ends it: either way a retry with the key tells, where "not placed"
/// could be untrue. A keyed order whose key cannot be read is told its outcome is unknown (an
/// earlier request may have placed it; a retry with its key tells).
async fn uncommitted(
    pool: &PgPool,
    batch: &[Pending],
    timeout: Duration,
    unplaced: CoalesceError,
    settled: Option<KeyAnswers>,
) -> Vec<Result<Answer, CoalesceError>> {
    let settled = match settled {
        Some(settled) => settled,
        None => {
            let read = tokio::time::timeout(timeout, batch::key_answers(pool, batch)).await;
            let Ok(Ok(from_keys)) = read else {
                return batch
                    .iter()
                    .map(|pending| match pending.key {
                        Some(_) => Err(CoalesceError::OutcomeUnknown { order_id: None }),
                        None => Err(unplaced.clone()),
                    })
                    .collect();
            };
            from_keys
        }
    };
    settled
        .into_iter()
        .map(|answer| answer.ok_or_else(|| unplaced.clone()))
        .collect()
}

/// One answer per order, in order: the batch's decisions if it committed, else why not.
/// A batch that runs past `timeout` before its commit is sent placed nothing; one whose
/// commit has no reply by then is checked as a lost commit. Either way its connection is
/// closed, not returned to the pool, where the first use would wait on it again.
async fn place_all(
    pool: &PgPool,
    product_id: i64,
    timeout: Duration,
    keys: KeyStore,
    batch: &[Pending],
) -> Vec<Result<Answer, CoalesceError>> {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => {
            let e = CoalesceError::Sql(Arc::new(e));
            return batch.iter().map(|_| Err(e.clone())).collect();
        }
    };
    let deadline = Instant::now() + timeout;
    let mut settled = None;
    // A block, so that the transaction's borrow of `conn` ends with it.
    let ended = {
        let decide = batch::decide(&mut conn, product_id, keys, timeout, batch, &mut settled);
        match tokio::time::timeout_at(deadline, decide).await {
            Ok(Ok((tx, decided))) => {
                let settled = settled.take().expect("keys taken before any decision");
                match tokio::time::timeout_at(deadline, tx.commit()).await {
                    Ok(Ok(())) => {
                        return decided
                            .into_iter()
                            .zip(settled)
                            .map(|(decision, settled)| Ok(decision.committed(settled)))
                            .collect();
                    }
                    Ok(Err(e)) => Ended::CommitLost(decided, settled, e.to_string()),
                    Err(_) => {
                        Ended::CommitLost(decided, settled, "no reply by the deadline".into())
                    }
                }
            }
            Ok(Err(e)) => Ended::Failed(e),
            Err(_) => Ended::TimedOut,
        }
    };
    match ended {
        Ended::Failed(e) => {
            // Rolled back (see `batch::decide`): the connection is sound, and goes back before
            // the keys are read on another.
            drop(conn);
            let unplaced = CoalesceError::Sql(Arc::new(e));
            uncommitted(pool, batch, timeout, unplaced, settled).await
        }
        Ended::TimedOut => {
            conn.close_on_drop();
            drop(conn);
            tracing::warn!(
                product_id,
                "an order batch ran past orders.batch_timeout_ms before its commit; \
                 nothing of it was placed"
            );
            uncommitted(pool, batch, timeout, CoalesceError::NotPlaced, settled).await
        }
        Ended::CommitLost(decided, settled, error) => {
            conn.close_on_drop();
            drop(conn);
            tracing::warn!(
                product_id,
                %error,
                "an order batch's commit failed; checking which orders exist"
            );
            outcome::settle_lost_commit(pool, product_id, batch, decided, settled).await
        }
    }
}
