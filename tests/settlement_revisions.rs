//! Stored transactions changed or removed while a settlement runs (an operator's fix, a
//! refund): the finalize corrects the job's sums by each change its batches did not see, on
//! any number of days, and publishes the input as the table holds it then; a TRUNCATE, or a
//! change of a run fixed before revisions were kept by row, starts the job over
//! (`process`-level: `settlement_processes.rs`).

mod common;

use std::time::{Duration, Instant};

use chrono_tz::Tz;
use common::engine::{Db, db, range};
use common::settlement::{self as support, day};
use settle::settlement::plan::Plan;
use settle::settlement::{SettleError, Zone, finalize, parts};

/// A run of 2025-01-01..=03 on 1,000 rows (and rows of a far day and rows above its mark,
/// neither in its input), its first batch read.
async fn run_mid_way() -> (Db, Plan) {
    let db = db("UTC", 2, 50).await;
    support::store_random(&db.pool, 17, 1_000, 4, 3).await;
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
    (db, plan)
}

/// Runs `mid` (changes of stored rows) between a run's first batch and its others, then
/// `late` after its last batch; returns the finalize's error, if any, once it checked that a
/// published job settled its input as the table holds it now.
async fn finalize_after(mid: &[&'static str], late: &[&'static str]) -> Option<SettleError> {
    let (db, plan) = run_mid_way().await;
    run_all(&db, mid).await;
    let plan = db.batches(&plan, None).await;
    run_all(&db, late).await;
    finalized_as_now(&db, &plan).await
}

async fn run_all(db: &Db, statements: &[&'static str]) {
    for &sql in statements {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
}

/// The finalize's error, or, when it published, a check that it settled the input (the rows
/// up to its high-water id) as the table holds it now.
async fn finalized_as_now(db: &Db, plan: &Plan) -> Option<SettleError> {
    let error = db.finalize(plan).await.err();
    if error.is_none() {
        let (from, to) = (day("2025-01-01"), day("2025-01-03"));
        let input = plan.run.high_water_id;
        let now = support::settled_now(&db.pool, (from, to), Tz::UTC, input).await;
        assert_eq!(db.settled("2025-01-01", "2025-01-03").await, now);
    }
    error
}

/// Changes of single rows of the input, each named by its day (the lowest id: the rows above
/// the mark are newer): ids follow the rows' external ids, random, not their days.
const ONE_ROW: [&str; 4] = [
    "update transactions set status = 'REFUNDED' where id = (select min(id) from transactions
                                          where paid_at >= '2025-01-03' and paid_at < '2025-01-04')",
    "delete from transactions where id = (select min(id) from transactions
                                          where paid_at >= '2025-01-02' and paid_at < '2025-01-03')",
    // Moved out of the range: its old day was in it.
    "update transactions set paid_at = paid_at + interval '30 days'
     where id = (select min(id) from transactions
                 where paid_at >= '2025-01-01' and paid_at < '2025-01-02')",
    // Deleted and put back under its own id: the deletion is corrected, and so the insert.
    "with gone as (delete from transactions
                   where id = (select min(id) from transactions
                               where paid_at >= '2025-01-02' and paid_at < '2025-01-03'
                                     and status = 'PAID')
                   returning *)
     insert into transactions select * from gone",
];

/// Changes of rows on every day, read and not yet read, some rows changed by several.
const EVERY_DAY: [&str; 7] = [
    "update transactions set status = case status when 'PAID' then 'REFUNDED' else 'PAID' end
     where id % 3 = 0",
    "update transactions set amount_cents = amount_cents + 7, fee_cents = fee_cents + 1
     where id % 4 = 1",
    // Across days: out of the range at its end, into it from the day before.
    "update transactions set paid_at = paid_at + interval '1 day' where id % 5 = 2",
    // Rows of a far day, which no batch read, into the range.
    "update transactions set paid_at = paid_at - interval '60 days' where external_id like 'far-%'",
    "delete from transactions where id % 6 = 5",
    // A changed id: the row at the old id is gone, the new one above the mark is not input.
    "update transactions set id = id + 100000 where id % 50 = 7",
    "update transactions set merchant_id = 'moved' where id % 7 = 3",
];

#[tokio::test]
async fn a_change_of_a_row_while_the_job_runs_is_corrected_and_published_as_the_table_is() {
    for sql in ONE_ROW {
        let found = finalize_after(&[sql], &[]).await;
        assert!(found.is_none(), "{sql}: {found:?}");
        let found = finalize_after(&[], &[sql]).await;
        assert!(found.is_none(), "{sql}, after the last batch: {found:?}");
    }
}

#[tokio::test]
async fn changes_on_every_day_are_corrected_whenever_they_land() {
    assert!(finalize_after(&EVERY_DAY, &[]).await.is_none());
    assert!(finalize_after(&[], &EVERY_DAY).await.is_none());
    let (mid, late) = EVERY_DAY.split_at(3);
    assert!(finalize_after(mid, late).await.is_none());
}

/// A job resumed by a worker whose `settlement.time_zone` changed since the job started keeps
/// the run's zone in its correction too, as in its batches.
#[tokio::test]
async fn a_job_resumed_under_another_zone_corrects_in_its_own() {
    let (mut db, plan) = run_mid_way().await;
    db.settings.zone = Zone::parse("Pacific/Kiritimati").unwrap();
    let resumed = db.start(1, plan.range()).await;
    assert_eq!(resumed.zone(), Zone::parse("UTC").unwrap());
    run_all(&db, &EVERY_DAY).await;
    let plan = db.batches(&resumed, None).await;
    assert!(finalized_as_now(&db, &plan).await.is_none());
}

/// A change a batch did not see because it was not yet committed when the batch read the row
/// (its transaction began before, committed after) is corrected too.
#[tokio::test]
async fn a_change_committed_after_a_batch_read_past_it_is_corrected() {
    let (db, plan) = run_mid_way().await;
    let refund = "update transactions set status = 'REFUNDED' where status = 'PAID'";
    let open = common::held_open(&db.pool, &[refund]).await;
    let plan = db.batches(&plan, None).await;
    open.commit().await.unwrap();
    assert!(finalized_as_now(&db, &plan).await.is_none());
}

/// Asserts that the finalize after `mid` (see [`finalize_after`]) starts the job over.
async fn assert_starts_over(mid: &[&'static str]) {
    let found = finalize_after(mid, &[]).await;
    assert!(
        matches!(found, Some(SettleError::Revised)),
        "{mid:?}: {found:?}"
    );
}

#[tokio::test]
async fn a_truncate_starts_the_job_over() {
    assert_starts_over(&["truncate transactions"]).await;
}

/// A TRUNCATE cannot slip in between the finalize's look for one and its correction: staged
/// here by a lock that holds the finalize between the two, the TRUNCATE waits for the finalize,
/// which publishes the input as it was; had the TRUNCATE gone first, the job must start over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_during_the_finalize_waits_for_it_or_starts_the_job_over() {
    let (db, plan) = run_mid_way().await;
    let plan = db.batches(&plan, None).await;
    let mut staged = db.pool.begin().await.unwrap();
    sqlx::query("lock table settlement_reads in access exclusive mode")
        .execute(&mut *staged)
        .await
        .unwrap();
    let finalize = tokio::spawn({
        let (pool, plan) = (db.pool.clone(), plan.clone());
        async move { common::engine::finalize_on(&pool, &plan).await }
    });
    common::wait_for_lock_waiter(&db.pool, "settlement_reads").await;
    let truncate = tokio::spawn({
        let pool = db.pool.clone();
        async move { sqlx::query("truncate transactions").execute(&pool).await }
    });
    // The TRUNCATE either ends (nothing stops it) or waits for the finalize's lock.
    common::processes::wait_for(std::time::Duration::from_secs(10), "the truncate", || {
        let (pool, done) = (db.pool.clone(), truncate.is_finished());
        async move {
            let waiting = common::lock_waiters(&pool, "truncate").await > 0;
            (done || waiting).then_some(())
        }
    })
    .await;
    let truncated_first = truncate.is_finished();
    staged.commit().await.unwrap();
    let finalized = finalize.await.unwrap();
    truncate.await.unwrap().unwrap();
    match truncated_first {
        true => assert!(
            matches!(finalized, Err(SettleError::Revised)),
            "{finalized:?}"
        ),
        false => assert!(finalized.is_ok(), "{finalized:?}"),
    }
}

/// A run the release before fixed (no `revision_snapshot`) has no reads to correct by: a change of
/// its input starts it over, one elsewhere lets it publish.
#[tokio::test]
async fn a_run_fixed_before_revisions_by_row_starts_over_when_its_input_changed() {
    let legacy = "update settlement_runs set revision_snapshot = null";
    assert_starts_over(&[legacy, ONE_ROW[0]]).await;
    let elsewhere = "delete from transactions where id > 1100";
    assert!(finalize_after(&[legacy, elsewhere], &[]).await.is_none());
}

/// Batches a worker of the release before read (no reads recorded) cannot be corrected: the
/// job starts over rather than count their rows' changes twice.
#[tokio::test]
async fn parts_whose_reads_are_not_all_recorded_start_the_job_over() {
    assert_starts_over(&["delete from settlement_reads"]).await;
}

#[tokio::test]
async fn a_change_outside_the_input_lets_the_job_publish() {
    for sql in [
        "update transactions set fee_cents = fee_cents + 1 where external_id like 'far-%'",
        "delete from transactions where paid_at < '2025-01-01'",
        // Rows stored after the job fixed its input (above its high-water id).
        "delete from transactions where id > 1100",
        "update transactions set status = status where false",
    ] {
        let found = finalize_after(&[sql], &[]).await;
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

/// A part batch on the primary runs in a transaction with an id of its own (it locks the run's
/// row `for share`, [`parts::lock_run`], as a worker's batch does), taken before it reads. A
/// change committed by another transaction after that id was taken and before the read has an
/// id between the read's snapshot's xmin (the batch's own id, when nothing older runs) and its
/// xmax, and that snapshot lists nothing in progress (never its own transaction): a standby's
/// shape. The read saw the change, and the finalize publishes without starting the job over.
///
/// The same read recorded by a worker of a release before migration 0024 (during a rolling
/// upgrade: no record of where it read) cannot be told from a standby read of that release,
/// which may have missed the change: the job starts over rather than guess. (One test, the two
/// in turn: each needs the whole server quiet, the other's batch included.)
#[tokio::test]
async fn a_change_committed_after_a_primary_batch_took_its_id_and_before_it_read_is_seen() {
    let found = finalize_after_a_change_between_a_batch_id_and_its_read(false).await;
    assert!(found.is_none(), "{found:?}");
    let found = finalize_after_a_change_between_a_batch_id_and_its_read(true).await;
    assert!(matches!(found, Some(SettleError::Revised)), "{found:?}");
}

/// Reads a job's one batch on the primary under the run's lock, a change committed by another
/// transaction between the batch's id and its read (see above), and finalizes; with
/// `release_before`, the read is left as a worker of a release before migration 0024 records
/// it. Returns the finalize's error, if any (see [`finalized_as_now`]).
async fn finalize_after_a_change_between_a_batch_id_and_its_read(
    release_before: bool,
) -> Option<SettleError> {
    // One part, one batch: no other batch of the job runs beside it.
    let db = db("UTC", 1, 5_000).await;
    support::store_random(&db.pool, 17, 1_000, 4, 3).await;
    let plan = db.start(1, range("2025-01-01", "2025-01-03")).await;
    let part = plan.parts[0].clone();
    // The shape needs nothing older than the batch running on the whole server (other tests',
    // other databases' transactions are listed too): tried until a read has it, pausing
    // between tries so that the tests running beside this one can end.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let mut tx = db.pool.begin().await.unwrap();
        assert!(parts::lock_run(&mut tx, 1, 0).await.unwrap());
        let own: Option<String> =
            sqlx::query_scalar("select pg_current_xact_id_if_assigned()::text")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        let own: i64 = own
            .expect("the batch has an id of its own")
            .parse()
            .unwrap();
        // The same row at each try (it stays PAID and in the range): a change the batch reads.
        let change: String = sqlx::query_scalar(
            "update transactions set amount_cents = amount_cents + 1
             where id = (select min(id) from transactions
                         where status = 'PAID'
                           and paid_at >= '2025-01-01' and paid_at < '2025-01-04')
             returning pg_current_xact_id()::text",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let change: i64 = change.parse().unwrap();
        assert!(change > own, "{change} {own}");
        let done = parts::process_batch(&mut tx, &plan, &part, db.settings.batch_size)
            .await
            .unwrap();
        assert!(done.is_done());
        let (xmin, xmax, listed): (String, String, i64) = sqlx::query_as(
            "select pg_snapshot_xmin(snapshot)::text, pg_snapshot_xmax(snapshot)::text,
                    (select count(*) from pg_snapshot_xip(snapshot))
             from settlement_reads where job_id = 1",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let (xmin, xmax): (i64, i64) = (xmin.parse().unwrap(), xmax.parse().unwrap());
        if listed > 0 || xmin != own {
            // Another transaction ran beside the batch: not the shape. Its change stays,
            // committed before the next try's id.
            tx.rollback().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert!(xmin < change && change < xmax, "{xmin} {change} {xmax}");
        if release_before {
            sqlx::query("update settlement_reads set on_standby = null")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let plan = Plan {
            parts: vec![done],
            ..plan
        };
        return finalized_as_now(&db, &plan).await;
    }
    panic!("no batch read with nothing else running on the server in 120 s");
}
