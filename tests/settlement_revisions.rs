//! Stored transactions changed or removed while a settlement runs (an operator's fix): the
//! finalize finds a change that touched the job's input before it publishes anything, and
//! lets every other change pass (`process`-level: `settlement_processes.rs`).

mod common;

use common::engine::{db, range};
use common::settlement as support;
use settle::settlement::SettleError;

/// Runs `sql` (a change of stored rows) between a run's first batches and its finalize;
/// returns the finalize's error, if any.
async fn finalize_after(sql: &'static str) -> Option<SettleError> {
    let db = db("UTC", 2, 50).await;
    support::store_random(&db.pool, 17, 1_000, 4, 3).await;
    // Rows of a far day and rows above the mark, neither in the job's input.
    let far = support::random_transactions(18, 100, 4, 1)
        .into_iter()
        .map(|mut row| {
            row.external_id = format!("far-{}", row.external_id);
            row.paid_at += chrono::Duration::days(60);
            row
        })
        .collect::<Vec<_>>();
    support::store(&db.pool, &far).await;
    let plan = db.start(1, range("2025-01-01", "2025-01-03")).await;
    support::store_random(&db.pool, 19, 100, 4, 3).await;
    let plan = db.batches(&plan, Some(1)).await;
    sqlx::query(sql).execute(&db.pool).await.unwrap();
    let plan = db.batches(&plan, None).await;
    db.finalize(&plan).await.err()
}

#[tokio::test]
async fn a_change_of_the_inputs_rows_is_found_before_the_job_publishes() {
    for sql in [
        "update transactions set status = 'REFUNDED' where id = 1000",
        "delete from transactions where id = 1",
        // Moved out of the range: its old day was in it.
        "update transactions set paid_at = paid_at + interval '30 days' where id = 2",
        "truncate transactions",
    ] {
        let found = finalize_after(sql).await;
        assert!(
            matches!(found, Some(SettleError::Revised)),
            "{sql}: {found:?}"
        );
    }
}

#[tokio::test]
async fn a_change_outside_the_input_lets_the_job_publish() {
    for sql in [
        "update transactions set fee_cents = fee_cents + 1 where external_id like 'far-%'",
        // Rows stored after the job fixed its input (above its high-water id).
        "delete from transactions where id > 1100",
        "update transactions set status = status where false",
    ] {
        let found = finalize_after(sql).await;
        assert!(found.is_none(), "{sql}: {found:?}");
    }
}
