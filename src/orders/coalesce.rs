//! Coalescing: concurrent orders for one product placed by one transaction.
//!
//! On a hot product every order commits on the same row, so throughput is bounded by commit
//! latency (one WAL flush each) and by the lock convoy of the buyers queued on that row: at 64
//! clients Postgres spends its time waking waiters that then queue again. Here each product
//! has one task per API process that takes every order waiting for it, locks the row once,
//! grants orders first-come-first-served while stock lasts, writes the grants and the single
//! stock decrement, and commits once for all of them. Every buyer still gets exactly the answer
//! the single statement would give: an order, or `OUT_OF_STOCK` with what was left.
//!
//! The no-oversell guarantee does not depend on this module: the decrement is computed under
//! the row lock in the same transaction as the inserts, and `stock_not_negative` still stands.
//!
//! No buyer is told "failed" for an order that exists. A batch whose statements fail placed
//! nothing, and its buyers are told so. A batch whose commit fails may have committed anyway
//! (the reply can be lost after the commit): [`super::outcome`] then waits for the batch's row
//! lock on a fresh connection and reads which of its orders exist, so each buyer gets the
//! stored order, "not placed", or, only if that check fails too, "outcome unknown" with the id
//! the order has if it was placed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::store::{self, Grant};
use super::{NewOrder, Order, Rejected, outcome};

/// A product's task ends after this long without orders, freeing its slot.
const IDLE: Duration = Duration::from_secs(5);

/// What a buyer is told: the database's decision, or why there is none.
type Answer = Result<Result<Order, Rejected>, CoalesceError>;

type Reply = oneshot::Sender<Answer>;

struct Pending {
    order: NewOrder,
    reply: Reply,
}

/// Routes each order to its product's task, starting the task on first use.
#[derive(Clone)]
pub struct Coalescer {
    pool: PgPool,
    max_batch: usize,
    products: Arc<Mutex<HashMap<i64, mpsc::UnboundedSender<Pending>>>>,
}

/// Why a coalesced order has no answer from the database.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoalesceError {
    /// A statement of the batch failed before its commit: nothing of it was placed.
    #[error(transparent)]
    Sql(Arc<sqlx::Error>),
    /// The batch's commit failed, and the check afterwards found this order not placed.
    #[error("the batch's commit failed and the order was not placed")]
    NotPlaced,
    /// The batch's commit reply was lost and the check could not tell whether it took effect;
    /// `order_id` is the order's id if it did (`None` for an order the batch did not grant).
    #[error("the batch's commit reply was lost; whether it took effect is unknown")]
    OutcomeUnknown { order_id: Option<i64> },
    #[error("the product's order task stopped before answering")]
    Dropped,
}

impl Coalescer {
    pub fn new(pool: PgPool, max_batch: usize) -> Self {
        Self {
            pool,
            max_batch,
            products: Arc::default(),
        }
    }

    /// Places `order` together with whatever other orders for its product are waiting.
    pub async fn place(&self, order: NewOrder) -> Result<Result<Order, Rejected>, CoalesceError> {
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending { order, reply };
        loop {
            let sender = self.sender(pending.order.product_id);
            match sender.send(pending) {
                Ok(()) => break,
                // The task ended (idle) between lookup and send: forget it and start another.
                Err(mpsc::error::SendError(returned)) => {
                    pending = returned;
                    self.forget(pending.order.product_id, &sender);
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
                    rx,
                    self.max_batch,
                ));
                tx
            })
            .clone()
    }

    fn forget(&self, product_id: i64, dead: &mpsc::UnboundedSender<Pending>) {
        let mut products = self.products.lock().expect("coalescer map poisoned");
        if products
            .get(&product_id)
            .is_some_and(|s| s.same_channel(dead))
        {
            products.remove(&product_id);
        }
    }
}

/// One product's loop: wait for an order, take every order already queued behind it (up to
/// `max_batch`), place them in one transaction, answer each buyer, repeat.
async fn run_product(
    pool: PgPool,
    product_id: i64,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    max_batch: usize,
) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        match tokio::time::timeout(IDLE, queue.recv_many(&mut batch, max_batch)).await {
            Ok(0) | Err(_) => {
                // Idle or every sender gone: close so late senders see the send fail and
                // start a fresh task, then answer anything that slipped in meanwhile.
                queue.close();
                while let Ok(pending) = queue.try_recv() {
                    batch.push(pending);
                }
                if !batch.is_empty() {
                    place_batch(&pool, product_id, std::mem::take(&mut batch)).await;
                }
                return;
            }
            Ok(_) => place_batch(&pool, product_id, std::mem::take(&mut batch)).await,
        }
    }
}

async fn place_batch(pool: &PgPool, product_id: i64, mut batch: Vec<Pending>) {
    // A buyer whose request was abandoned while queued (timed out, disconnected) gets no order:
    // nobody would learn it was placed.
    batch.retain(|pending| !pending.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    crate::metrics::order_batch(batch.len());
    let orders: Vec<&NewOrder> = batch.iter().map(|p| &p.order).collect();
    let answers = place_all(pool, product_id, &orders).await;
    for (pending, answer) in batch.into_iter().zip(answers) {
        let _ = pending.reply.send(answer);
    }
}

/// One answer per order, in order: the batch's decisions if it committed, else why not.
async fn place_all(pool: &PgPool, product_id: i64, orders: &[&NewOrder]) -> Vec<Answer> {
    let (tx, decided) = match grant_all(pool, product_id, orders).await {
        Ok(Some(granted)) => granted,
        Ok(None) => {
            return orders
                .iter()
                .map(|_| Ok(Err(Rejected::UnknownProduct)))
                .collect();
        }
        Err(e) => {
            let e = Arc::new(e);
            return orders
                .iter()
                .map(|_| Err(CoalesceError::Sql(e.clone())))
                .collect();
        }
    };
    match tx.commit().await {
        Ok(()) => decided.into_iter().map(Ok).collect(),
        Err(e) => {
            tracing::warn!(
                product_id,
                error = %e,
                "an order batch's commit failed; checking which orders exist"
            );
            settle_lost_commit(pool, product_id, decided).await
        }
    }
}

/// The answers of a batch whose commit failed: the stored orders if it committed, "not
/// placed" if not, "unknown" if that cannot be found out. An `OUT_OF_STOCK` decision stands
/// only if the batch committed or granted nothing: it was computed after the batch's grants,
/// which an aborted batch never made.
async fn settle_lost_commit(
    pool: &PgPool,
    product_id: i64,
    decided: Vec<Result<Order, Rejected>>,
) -> Vec<Answer> {
    let ids: Vec<i64> = decided.iter().flatten().map(|order| order.id).collect();
    if ids.is_empty() {
        return decided.into_iter().map(Ok).collect();
    }
    let Some(stored) = outcome::placed(pool, product_id, &ids).await else {
        return decided
            .into_iter()
            .map(|decision| match decision {
                Ok(order) => Err(CoalesceError::OutcomeUnknown {
                    order_id: Some(order.id),
                }),
                Err(_) => Err(CoalesceError::NotPlaced),
            })
            .collect();
    };
    let committed = !stored.is_empty();
    let mut stored: HashMap<i64, Order> = stored.into_iter().map(|o| (o.id, o)).collect();
    decided
        .into_iter()
        .map(|decision| match decision {
            Ok(order) => stored
                .remove(&order.id)
                .map(Ok)
                .ok_or(CoalesceError::NotPlaced),
            Err(rejected) if committed => Ok(Err(rejected)),
            Err(_) => Err(CoalesceError::NotPlaced),
        })
        .collect()
}

/// Opens the batch's transaction, locks the product row once, grants orders in arrival order
/// while stock lasts, and writes the grants and one stock decrement; returns the transaction,
/// still to commit, with each order's decision. `None` if the product does not exist.
async fn grant_all(
    pool: &PgPool,
    product_id: i64,
    orders: &[&NewOrder],
) -> Result<Option<(Transaction<'static, Postgres>, Vec<Result<Order, Rejected>>)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some((mut stock, price_cents)) = store::lock_product(&mut tx, product_id).await? else {
        // Nothing was written: the answer stands whether or not the rollback arrives.
        let _ = tx.rollback().await;
        return Ok(None);
    };
    let mut grants = Vec::with_capacity(orders.len());
    let mut answers: Vec<Option<Rejected>> = Vec::with_capacity(orders.len());
    for order in orders {
        let quantity = i64::from(order.quantity.get());
        if quantity <= stock {
            stock -= quantity;
            grants.push(Grant {
                buyer_id: order.buyer_id.as_str(),
                quantity: order.quantity.get(),
            });
            answers.push(None);
        } else {
            answers.push(Some(Rejected::OutOfStock { available: stock }));
        }
    }
    let mut placed = store::insert_grants(&mut tx, product_id, price_cents, &grants)
        .await?
        .into_iter();
    let decided = answers
        .into_iter()
        .map(|rejected| match rejected {
            Some(rejected) => Err(rejected),
            None => Ok(placed.next().expect("one placed order per grant")),
        })
        .collect();
    Ok(Some((tx, decided)))
}
