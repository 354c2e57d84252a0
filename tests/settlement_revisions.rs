//! Stored transactions changed or removed while a settlement runs (an operator's fix, a
//! refund): the finalize finds a change that touched the job's input before it publishes
//! anything, sums the days it touched again (or, past `settlement.revised_days_max`, starts
//! over), and lets every other change pass (`process`-level: `settlement_processes.rs`).

mod common;

use chrono_tz::Tz;
use common::engine::{db, range};
use common::settlement::{self as support, day};
use settle::settlement::{SettleError, finalize};

/// Runs `sql` (a change of stored rows) between a run's first batches and its finalize, which
/// sums at most `revised_days_max` revised days again; returns the finalize's error, if any,
/// once it checked that a published job settled the table as it is now.
async fn finalize_after(sql: &'static str, revised_days_max: i64) -> Option<SettleError> {
    let mut db = db("UTC", 2, 50).await;
    db.settings.revised_days_max = revised_days_max;
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
    let error = db.finalize(&plan).await.err();
    if error.is_none() {
        let (from, to) = (day("2025-01-01"), day("2025-01-03"));
        let input = plan.run.high_water_id;
        let now = support::settled_now(&db.pool, (from, to), Tz::UTC, input).await;
        assert_eq!(db.settled("2025-01-01", "2025-01-03").await, now, "{sql}");
    }
    error
}

/// The changes of the input [`finalize_after`] makes.
/// Each names a row of the input by its day (the lowest id: the rows above the mark are newer):
/// ids follow the rows' external ids, random, not their days.
const CHANGES: [&str; 4] = [
    "update transactions set status = 'REFUNDED' where id = (select min(id) from transactions
                                          where paid_at >= '2025-01-03' and paid_at < '2025-01-04')",
    "delete from transactions where id = (select min(id) from transactions
                                          where paid_at >= '2025-01-02' and paid_at < '2025-01-03')",
    // Moved out of the range: its old day was in it.
    "update transactions set paid_at = paid_at + interval '30 days'
     where id = (select min(id) from transactions
                 where paid_at >= '2025-01-01' and paid_at < '2025-01-02')",
    "truncate transactions",
];

#[tokio::test]
async fn a_change_of_more_days_than_are_summed_again_starts_the_job_over() {
    for sql in CHANGES {
        let found = finalize_after(sql, 0).await;
        assert!(
            matches!(found, Some(SettleError::Revised)),
            "{sql}: {found:?}"
        );
    }
}

#[tokio::test]
async fn a_change_of_a_few_days_is_summed_again_and_published_as_the_table_is() {
    for sql in CHANGES {
        let found = finalize_after(sql, 3).await;
        assert!(found.is_none(), "{sql}: {found:?}");
    }
}

#[tokio::test]
async fn a_change_outside_the_input_lets_the_job_publish() {
    for sql in [
        "update transactions set fee_cents = fee_cents + 1 where external_id like 'far-%'",
        // Rows of the day before the range, within the slack of the revisions' first look.
        "delete from transactions where paid_at < '2025-01-01'",
        // Rows stored after the job fixed its input (above its high-water id).
        "delete from transactions where id > 1100",
        "update transactions set status = status where false",
    ] {
        let found = finalize_after(sql, 0).await;
        assert!(found.is_none(), "{sql}: {found:?}");
    }
}

/// The noted revisions no job can still need go: older than the retention and at or below
/// every live run's mark. A live run keeps those above its mark, and a young one stays anyway
/// (a job between reading its mark and recording its run may need it).
#[tokio::test]
async fn revisions_no_job_can_need_are_pruned() {
    let db = db("UTC", 2, 50).await;
    support::store_random(&db.pool, 17, 100, 4, 3).await;
    let revise = || async {
        let sql = "update transactions set fee_cents = fee_cents where id = 1";
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    };
    let ids = || async {
        let sql = "select coalesce(array_agg(id order by id), '{}') from transaction_revisions";
        sqlx::query_scalar::<_, Vec<i64>>(sql)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let prune = || async {
        let mut conn = db.pool.acquire().await.unwrap();
        finalize::prune_revisions(&mut conn, 24).await.unwrap()
    };
    revise().await;
    revise().await;
    db.start(1, range("2025-01-01", "2025-01-03")).await; // its mark: the second revision
    revise().await;
    let old = "update transaction_revisions set noted_at = now() - interval '25 hours'";
    sqlx::query(old).execute(&db.pool).await.unwrap();
    revise().await; // young
    let all = ids().await;
    assert_eq!(all.len(), 4);

    assert_eq!(prune().await, 2);
    assert_eq!(ids().await, all[2..]);
    // The run gone, only the young one stays.
    sqlx::query("delete from settlement_runs")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(prune().await, 1);
    assert_eq!(ids().await, all[3..]);
}
