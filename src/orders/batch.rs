//! One coalesced batch's transaction ([`super::coalesce`]): lock the product row, take the
//! keyed orders' keys, grant orders in arrival order while stock lasts, write the grants with
//! one stock decrement, and store each keyed order's answer under its key. The caller commits,
//! so the orders, the decrement and the keys' answers take effect together or not at all.
//!
//! A keyed order whose key is in use, was used with another body, or already has an answer
//! takes no part in the grants: it is answered from its key, whatever becomes of the batch.
//! Two orders of one batch with the same key are concurrent requests with one key: the first
//! goes ahead, the second is told the key is in use, as it would be by a separate transaction.

use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Transaction};

use super::coalesce::{Answer, KeyStore, Pending};
use super::store::{self, Grant};
use super::{Order, Rejected};
use crate::idempotency::{self, Claim, KeyedRequest, Record, StoredResponse};

/// What the batch decided for one order, answered once its transaction has ended.
pub(super) enum Decision {
    /// An order without a key: placed, or why not.
    Plain(Result<Order, Rejected>),
    /// A keyed order's grant or refusal (the order, if granted), and the response this
    /// transaction stores under its key.
    Keyed {
        order: Option<Order>,
        response: StoredResponse,
    },
    /// A keyed order answered from its key alone (the answer is the order's in the batch's
    /// [`KeyAnswers`]): it stands whether the batch commits or not.
    Settled,
}

/// Per order, the answer its key alone gives (an earlier request's answer, a key in use or
/// reused), or `None` for an order the batch decides.
pub(super) type KeyAnswers = Vec<Option<Answer>>;

impl Decision {
    /// The buyer's answer once the batch has committed; `settled` is the order's key answer.
    pub(super) fn committed(self, settled: Option<Answer>) -> Answer {
        match self {
            Self::Plain(decided) => Answer::Decided(decided),
            Self::Keyed { response, .. } => Answer::Stored(response),
            Self::Settled => settled.expect("a settled order has its key's answer"),
        }
    }
}

/// An order's fate before the statements that write it.
enum Verdict {
    /// Answered from its key.
    Settled,
    Grant,
    Refuse(Rejected),
}

/// Opens the batch's transaction and writes its decisions; returns the transaction, still to
/// commit, with one decision per order. If a statement fails, the transaction is rolled back
/// here: a dropped one would hold the product's row and the keys until its connection is
/// next used. The keys' answers are put in `settled` as soon as the keys are taken: they
/// stand even if the batch then fails or is given up on.
///
/// No lock is waited for longer than `lock_timeout` (the batch's deadline): the server ends
/// the wait itself (55P03), so a batch given up on does not leave its backend queued on the
/// product's row, one more for every batch while the row stays locked.
pub(super) async fn decide<'c>(
    conn: &'c mut PgConnection,
    product_id: i64,
    keys: KeyStore,
    lock_timeout: Duration,
    batch: &[Pending],
    settled: &mut Option<KeyAnswers>,
) -> Result<(Transaction<'c, Postgres>, Vec<Decision>), sqlx::Error> {
    // Dynamic: SET takes no parameter; the value is an integer. One round trip with the BEGIN.
    let begin = format!(
        "begin; set local lock_timeout = {}",
        lock_timeout.as_millis().max(1)
    );
    let mut tx = conn.begin_with(AssertSqlSafe(begin)).await?;
    match decide_in(&mut tx, product_id, keys, batch, settled).await {
        Ok(decided) => Ok((tx, decided)),
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

async fn decide_in(
    tx: &mut PgConnection,
    product_id: i64,
    keys: KeyStore,
    batch: &[Pending],
    settled: &mut Option<KeyAnswers>,
) -> Result<Vec<Decision>, sqlx::Error> {
    let product = store::lock_product(tx, product_id).await?;
    let verdicts = grant(product, batch, settled.insert(claim_keys(tx, batch).await?));
    let grants: Vec<Grant<'_>> = batch
        .iter()
        .zip(&verdicts)
        .filter(|(_, verdict)| matches!(verdict, Verdict::Grant))
        .map(|(pending, _)| Grant {
            buyer_id: pending.order.buyer_id.as_str(),
            quantity: pending.order.quantity.get(),
        })
        .collect();
    let price_cents = product.map_or(0, |(_, price_cents)| price_cents);
    let mut placed = store::insert_grants(tx, product_id, price_cents, &grants)
        .await?
        .into_iter();
    let mut decisions = Vec::with_capacity(batch.len());
    for (pending, verdict) in batch.iter().zip(verdicts) {
        let decided = match verdict {
            Verdict::Settled => {
                decisions.push(Decision::Settled);
                continue;
            }
            Verdict::Grant => Ok(placed.next().expect("one placed order per grant")),
            Verdict::Refuse(rejected) => Err(rejected),
        };
        decisions.push(match pending.key {
            None => Decision::Plain(decided),
            Some(_) => Decision::Keyed {
                order: decided.as_ref().ok().cloned(),
                response: (keys.render)(&decided).map_err(|e| sqlx::Error::Encode(e.into()))?,
            },
        });
    }
    store_answers(tx, batch, &decisions, keys.ttl_hours).await?;
    Ok(decisions)
}

/// What the batch's keys give a request now, each key taken and let go at once (no wait for
/// one held elsewhere): the answers of a batch that committed nothing, whose keyed orders get
/// what a retry would (an earlier request's answer, a key in use or reused).
pub(super) async fn key_answers(
    pool: &PgPool,
    batch: &[Pending],
) -> Result<KeyAnswers, sqlx::Error> {
    if batch.iter().all(|pending| pending.key.is_none()) {
        return Ok(batch.iter().map(|_| None).collect());
    }
    let mut tx = pool.begin().await?;
    let answers = claim_keys(&mut tx, batch).await;
    // Only read: whether the rollback arrives changes nothing but when the locks are free.
    let _ = tx.rollback().await;
    answers
}

/// Takes the batch's keys: per order, the answer its key alone gives (replay, in use,
/// reused), or `None` to decide it (no key, or a key taken by this transaction).
async fn claim_keys(tx: &mut PgConnection, batch: &[Pending]) -> Result<KeyAnswers, sqlx::Error> {
    let mut answers: Vec<Option<Answer>> = batch.iter().map(|_| None).collect();
    // A key sent twice in the batch executes once ([`idempotency::claim_all`]).
    let claimed: Vec<(usize, KeyedRequest<'_>)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, pending)| {
            let keyed = pending.key.as_ref()?;
            Some((i, (&keyed.key, &keyed.request)))
        })
        .collect();
    if claimed.is_empty() {
        return Ok(answers);
    }
    let requests: Vec<KeyedRequest<'_>> = claimed.iter().map(|(_, request)| *request).collect();
    let claims = idempotency::claim_all(tx, &requests).await?;
    for ((i, _), claim) in claimed.into_iter().zip(claims) {
        answers[i] = match claim {
            Claim::Execute => None,
            Claim::Replay(stored) => Some(Answer::Replay(stored)),
            Claim::Refused(e) => Some(Answer::Refused(e)),
        };
    }
    Ok(answers)
}

/// Grants the orders to decide in arrival order while `product`'s stock (locked) lasts;
/// every order is refused when the product does not exist.
fn grant(product: Option<(i64, i64)>, batch: &[Pending], settled: &KeyAnswers) -> Vec<Verdict> {
    let mut stock = product.map(|(stock, _)| stock);
    batch
        .iter()
        .zip(settled)
        .map(|(pending, settled)| {
            if settled.is_some() {
                return Verdict::Settled;
            }
            let Some(left) = stock.as_mut() else {
                return Verdict::Refuse(Rejected::UnknownProduct);
            };
            let quantity = i64::from(pending.order.quantity.get());
            if quantity <= *left {
                *left -= quantity;
                Verdict::Grant
            } else {
                Verdict::Refuse(Rejected::OutOfStock { available: *left })
            }
        })
        .collect()
}

/// Stores the answers of the orders this transaction decided under their keys.
async fn store_answers(
    tx: &mut PgConnection,
    batch: &[Pending],
    decisions: &[Decision],
    ttl_hours: i64,
) -> Result<(), sqlx::Error> {
    let records: Vec<Record<'_>> = batch
        .iter()
        .zip(decisions)
        .filter_map(|(pending, decision)| match (&pending.key, decision) {
            (Some(keyed), Decision::Keyed { response, .. }) => Some(Record {
                key: &keyed.key,
                request: &keyed.request,
                status: response.status,
                body: &response.body,
            }),
            _ => None,
        })
        .collect();
    idempotency::store_all(tx, &records, ttl_hours).await
}
