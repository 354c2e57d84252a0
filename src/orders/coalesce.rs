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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::store::{self, Grant};
use super::{NewOrder, Order, Rejected};

/// A product's task ends after this long without orders, freeing its slot.
const IDLE: Duration = Duration::from_secs(5);

type Reply = oneshot::Sender<Result<Result<Order, Rejected>, Arc<sqlx::Error>>>;

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
#[derive(Debug, thiserror::Error)]
pub enum CoalesceError {
    #[error(transparent)]
    Sql(Arc<sqlx::Error>),
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
        answer
            .await
            .map_err(|_| CoalesceError::Dropped)?
            .map_err(CoalesceError::Sql)
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
    let orders: Vec<&NewOrder> = batch.iter().map(|p| &p.order).collect();
    match place_all(pool, product_id, &orders).await {
        Ok(outcomes) => {
            for (pending, outcome) in batch.into_iter().zip(outcomes) {
                let _ = pending.reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for pending in batch {
                let _ = pending.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Locks the product row once, grants orders in arrival order while stock lasts, and writes
/// the grants and one stock decrement in the same transaction.
async fn place_all(
    pool: &PgPool,
    product_id: i64,
    orders: &[&NewOrder],
) -> Result<Vec<Result<Order, Rejected>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some((mut stock, price_cents)) = store::lock_product(&mut tx, product_id).await? else {
        tx.rollback().await?;
        return Ok(orders
            .iter()
            .map(|_| Err(Rejected::UnknownProduct))
            .collect());
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
    tx.commit().await?;
    Ok(answers
        .into_iter()
        .map(|rejected| match rejected {
            Some(rejected) => Err(rejected),
            None => Ok(placed.next().expect("one placed order per grant")),
        })
        .collect())
}
