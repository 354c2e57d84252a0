//! The settlement steps against a real database, driven here the way the queue drives them
//! (each batch in its own committed transaction, parts concurrently): results equal a reference
//! computed in Rust, after interruptions, reruns, overlaps, empty ranges and zone edges.

mod common;

use chrono_tz::Tz;
use common::engine::{csv, db, download, range};
use common::settlement as support;
use settle::settlement::plan;
use settle::settlement::transactions::{NewTransaction, Status};
use settle::settlement::{SettleError, finalize, overflow, parts};
use support::{at, day, reference, settlements, store, txn};

#[tokio::test]
async fn a_run_equals_the_reference_in_table_and_csv() {
    let db = db("UTC", 3, 97).await;
    let rows = support::store_random(&db.pool, 1, 3000, 7, 5).await;
    let (from, to) = (day("2025-01-01"), day("2025-01-05"));
    let path = db.run(1, range("2025-01-01", "2025-01-05")).await;
    let expected = reference(&rows, from, to, Tz::UTC);
    assert!(expected.len() > 20);
    assert_eq!(settlements(&db.pool, from, to).await, expected);
    assert_eq!(csv(&path), expected);
    // Working rows are gone.
    let left = common::scalar(
        &db.pool,
        "select (select count(*) from settlement_batches) + (select count(*) from settlement_parts)
              + (select count(*) from settlement_runs)",
    )
    .await;
    assert_eq!(left, 0);
}

/// Rewinds the stored part `part` of job 1 to `to` (its cursor and count), its sums and reads
/// past that gone: the database as a server crash leaves it when the part's latest batches,
/// committed asynchronously, were not yet on disk.
async fn lose_batches(pool: &sqlx::PgPool, to: &plan::Part) {
    sqlx::query(
        "with rewound as (
             update settlement_parts set cursor_id = $2, processed = $3
             where job_id = 1 and part = $1
         ), unread as (
             delete from settlement_reads where job_id = 1 and part = $1 and lo_id >= $2
         )
         delete from settlement_batches where job_id = 1 and part = $1 and end_id > $2",
    )
    .bind(to.part)
    .bind(to.cursor_id)
    .bind(to.processed)
    .execute(pool)
    .await
    .unwrap();
}

/// A database behind the run (its latest batches lost in a crash while the run went on in
/// memory) is found before a cursor moves past rows never summed: by the part's next batch,
/// and by the finalize once every part is done; the run resumed from what the database kept
/// equals the reference.
#[tokio::test]
async fn a_database_that_lost_the_latest_batches_is_found_behind_and_resumed() {
    let db = db("UTC", 2, 50).await;
    let rows = support::store_random(&db.pool, 14, 1500, 5, 3).await;
    let plan = db.start(1, range("2025-01-01", "2025-01-03")).await;
    let first = plan.parts[0].clone();
    let mut part = first.clone();
    for _ in 0..3 {
        let mut tx = db.pool.begin().await.unwrap();
        part = parts::process_batch(&mut tx, &plan, &part, 50)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    lose_batches(&db.pool, &first).await;
    let mut tx = db.pool.begin().await.unwrap();
    let next = parts::process_batch(&mut tx, &plan, &part, 50).await;
    assert!(matches!(next, Err(SettleError::Behind)), "{next:?}");
    drop(tx);

    let done = db.batches(&db.start(1, plan.range()).await, None).await;
    lose_batches(&db.pool, &first).await;
    let mut tx = db.pool.begin().await.unwrap();
    let finalized = finalize::finalize(&mut tx, &done).await;
    assert!(
        matches!(finalized, Err(SettleError::Behind)),
        "{finalized:?}"
    );
    drop(tx);

    let resumed = db.batches(&db.start(1, plan.range()).await, None).await;
    db.assert_read_all(&resumed).await;
    let path = db.finalize(&resumed).await.unwrap();
    let expected = reference(&rows, day("2025-01-01"), day("2025-01-03"), Tz::UTC);
    assert_eq!(csv(&path), expected);
}

#[tokio::test]
async fn a_resumed_run_equals_an_uninterrupted_one() {
    let db = db("UTC", 2, 50).await;
    let rows = support::store_random(&db.pool, 2, 2000, 5, 3).await;
    let plan = db.start(7, range("2025-01-01", "2025-01-03")).await;
    let plan = db.batches(&plan, Some(4)).await;
    assert!(plan.processed() > 0 && plan.processed() < plan.run.total);
    // A batch whose transaction never commits (the worker died mid-batch) changes nothing.
    let mut tx = db.pool.begin().await.unwrap();
    parts::process_batch(&mut tx, &plan, &plan.parts[0], 50)
        .await
        .unwrap();
    drop(tx);
    // Rows arriving after the start are not part of this job's input.
    support::store_random(&db.pool, 3, 100, 5, 3).await;
    // A new worker starts from scratch: it gets the fixed input and the committed cursors.
    let resumed = db.start(7, range("2025-01-01", "2025-01-03")).await;
    assert_eq!(resumed, plan);
    let done = db.batches(&resumed, None).await;
    db.assert_read_all(&done).await;
    let path = db.finalize(&done).await.unwrap();
    let expected = reference(&rows, day("2025-01-01"), day("2025-01-03"), Tz::UTC);
    assert_eq!(csv(&path), expected);
    assert_eq!(db.settled("2025-01-01", "2025-01-03").await, expected);
}

#[tokio::test]
async fn an_older_input_finishing_last_never_overwrites_a_newer_one() {
    let db = db("UTC", 2, 300).await;
    let old = support::store_random(&db.pool, 40, 1500, 4, 4).await;
    // A fixes its input, then new transactions arrive (one a merchant-day only they have).
    let a = db.start(1, range("2025-01-01", "2025-01-04")).await;
    let mut new = support::random_transactions(41, 500, 4, 4);
    new.push(txn(
        "only-new",
        700,
        7,
        Status::Paid,
        at("2025-01-02T10:00:00Z"),
    ));
    store(&db.pool, &new).await;
    // B covers part of A's range with the newer input and completes first.
    let b_csv = db.run(2, range("2025-01-02", "2025-01-03")).await;
    let a = db.batches(&a, None).await;
    db.finalize(&a).await.unwrap();

    let (expected, newest) = support::newest_wins(&old, &new);
    assert!(newest.contains_key(&("only-new".to_owned(), day("2025-01-02"))));
    assert_eq!(db.settled("2025-01-01", "2025-01-04").await, expected);
    // B's CSV still matches the table; A's CSV is the table as A left it.
    assert_eq!(csv(&b_csv), newest);
    assert_eq!(db.settled("2025-01-02", "2025-01-03").await, newest);
    assert_eq!(csv(&download(&db.pool, 1).await), expected);
}

/// Rows moved from a day a newer job settled into an older job's other days while the older
/// one ran, read by its batches or corrected at its finalize: the older job would publish its
/// days as the table holds them at its finalize, newer than the day the newer job holds, and
/// the moved rows would count on both days. It publishes nothing and starts over instead (as
/// the queue runs it again), fixing an input newer than the other job's, and wins every day
/// of its range: the days settle as the table holds them now.
#[tokio::test]
async fn an_older_input_revised_beside_a_newer_ones_day_starts_over_and_wins_its_days() {
    for moved_before_its_batches in [false, true] {
        let db = db("UTC", 2, 50).await;
        support::store_random(&db.pool, 17, 1000, 4, 3).await;
        let a = db.start(1, range("2025-01-01", "2025-01-03")).await;
        let b = db.start(2, range("2025-01-02", "2025-01-02")).await;
        let b = db.batches(&b, None).await;
        db.finalize(&b).await.unwrap();
        let moved = "update transactions set paid_at = paid_at - interval '1 day'
                     where paid_at >= '2025-01-02' and paid_at < '2025-01-03' and status = 'PAID'";
        if moved_before_its_batches {
            sqlx::query(moved).execute(&db.pool).await.unwrap();
        }
        let a = db.batches(&a, None).await;
        if !moved_before_its_batches {
            sqlx::query(moved).execute(&db.pool).await.unwrap();
        }
        let published = db.settled("2025-01-01", "2025-01-03").await;
        if let Err(e) = db.finalize(&a).await {
            assert!(matches!(e, SettleError::Revised), "{e:?}");
            assert_eq!(db.settled("2025-01-01", "2025-01-03").await, published);
            let mut conn = db.pool.acquire().await.unwrap();
            finalize::delete_working_rows(&mut conn, 1, None)
                .await
                .unwrap();
            db.run(1, range("2025-01-01", "2025-01-03")).await;
        }
        let days = (day("2025-01-01"), day("2025-01-03"));
        let now = support::settled_now(&db.pool, days, Tz::UTC, i64::MAX).await;
        assert_eq!(
            db.settled("2025-01-01", "2025-01-03").await,
            now,
            "moved before its batches: {moved_before_its_batches}"
        );
    }
}

/// The reference sums of each `(rows, from, to)` (UTC days), together: a table whose days were
/// settled from different inputs.
fn days_of(parts: &[(&[NewTransaction], &str, &str)]) -> support::Settled {
    let days = parts
        .iter()
        .flat_map(|(rows, from, to)| reference(rows, day(from), day(to), Tz::UTC));
    days.collect()
}

/// Refunds `external_ids` in the table and in `rows` alike, as an operator fixing the data.
async fn refund(db: &common::engine::Db, rows: &mut [NewTransaction], external_ids: &[&str]) {
    for row in rows.iter_mut() {
        if external_ids.contains(&row.external_id.as_str()) {
            row.status = Status::Refunded;
        }
    }
    let refunded = common::scalar(
        &db.pool,
        &format!(
            "with fixed as (update transactions set status = 'REFUNDED'
                            where external_id in ('{}') returning 1)
             select count(*) from fixed",
            external_ids.join("', '")
        ),
    )
    .await;
    assert_eq!(refunded, external_ids.len() as i64);
}

/// Data fixed in place (no new row, so the same high-water id): settling the day again replaces
/// it, a merchant-day left without a PAID transaction included, and a job that read the data
/// before the fix and finishes last sums the fixed day again (or, when it may not, publishes
/// nothing and starts over): it neither changes the day the newer job settled nor puts the
/// removed merchant-day back.
#[tokio::test]
async fn data_fixed_in_place_is_the_newest_input_whichever_job_finishes_last() {
    let db = db("UTC", 2, 100).await;
    let mut rows = vec![
        txn("m1", 1000, 30, Status::Paid, at("2025-01-05T10:00:00Z")),
        txn("m2", 5000, 100, Status::Paid, at("2025-01-05T11:00:00Z")),
        txn("m2", 7000, 100, Status::Paid, at("2025-01-05T12:00:00Z")),
        txn("m2", 900, 9, Status::Paid, at("2025-01-06T12:00:00Z")),
    ];
    store(&db.pool, &rows).await;
    let before = db.start(1, range("2025-01-05", "2025-01-06")).await;
    let before = db.batches(&before, None).await;
    let fixed = [rows[0].external_id.clone(), rows[1].external_id.clone()];
    refund(&db, &mut rows, &[&fixed[0], &fixed[1]]).await;

    let after = db.run(2, range("2025-01-05", "2025-01-05")).await;
    let newest = reference(&rows, day("2025-01-05"), day("2025-01-05"), Tz::UTC);
    assert_eq!(newest.len(), 1, "m2 alone is left on the 5th: {newest:?}");
    assert_eq!(csv(&after), newest);
    assert_eq!(db.settled("2025-01-05", "2025-01-05").await, newest);

    let expected = reference(&rows, day("2025-01-05"), day("2025-01-06"), Tz::UTC);
    db.finalize(&before).await.unwrap();
    assert_eq!(db.settled("2025-01-05", "2025-01-05").await, newest);
    assert_eq!(db.settled("2025-01-05", "2025-01-06").await, expected);
    db.run(3, range("2025-01-05", "2025-01-06")).await;
    assert_eq!(db.settled("2025-01-05", "2025-01-06").await, expected);
}

/// The newest rows deleted: the high-water id goes down, and the re-run still replaces the day.
#[tokio::test]
async fn deleting_the_newest_rows_and_settling_again_replaces_the_day() {
    let db = db("UTC", 1, 100).await;
    let rows = vec![
        txn("m1", 1000, 30, Status::Paid, at("2025-01-05T10:00:00Z")),
        txn("m2", 5000, 100, Status::Paid, at("2025-01-05T11:00:00Z")),
    ];
    store(&db.pool, &rows).await;
    db.run(1, range("2025-01-05", "2025-01-05")).await;
    let delete = format!(
        "with gone as (delete from transactions where external_id = '{}' returning 1)
         select count(*) from gone",
        rows[1].external_id
    );
    assert_eq!(common::scalar(&db.pool, &delete).await, 1);
    let again = csv(&db.run(2, range("2025-01-05", "2025-01-05")).await);
    let expected = reference(&rows[..1], day("2025-01-05"), day("2025-01-05"), Tz::UTC);
    assert_eq!(
        (again, db.settled("2025-01-05", "2025-01-05").await),
        (expected.clone(), expected)
    );
}

/// During a rolling upgrade a worker of the release before migration 0018 settles a day from a
/// newer input: it records its high-water id as the rows' snapshot and nothing in
/// `settlement_days`. A job fixed before that input, finishing after, leaves the day alone; a
/// job fixed after it (its snapshot above every high-water id) replaces it.
#[tokio::test]
async fn a_day_an_older_release_settled_from_a_newer_input_is_left_to_newer_jobs() {
    let db = db("UTC", 1, 100).await;
    let old = support::store_random(&db.pool, 9, 300, 3, 2).await;
    let older = db.start(1, range("2025-01-01", "2025-01-02")).await;
    let older = db.batches(&older, None).await;
    let new = support::store_random(&db.pool, 10, 50, 3, 2).await;
    // The older release's job, fixed now: its high-water id is its snapshot.
    settled_by(&db.pool, "other-release", "2025-01-02", 77, None).await;
    db.finalize(&older).await.unwrap();
    let left = db.settled("2025-01-02", "2025-01-02").await;
    assert_eq!(
        left.keys().map(|(m, _)| m.as_str()).collect::<Vec<_>>(),
        ["other-release"]
    );

    db.run(2, range("2025-01-02", "2025-01-02")).await;
    let all = [&old[..], &new[..]].concat();
    let expected = days_of(&[
        (&old, "2025-01-01", "2025-01-01"),
        (&all, "2025-01-02", "2025-01-02"),
    ]);
    assert_eq!(db.settled("2025-01-01", "2025-01-02").await, expected);
}

/// A `settlements` row of 5 cents for `merchant` on `date`, as job `job_id` left it, built
/// from input snapshot `snapshot` (`None`: the newest id of `transactions`, as a release
/// before migration 0018 named its snapshots).
async fn settled_by(
    pool: &sqlx::PgPool,
    merchant: &str,
    date: &str,
    job_id: i64,
    snapshot: Option<i64>,
) {
    sqlx::query(
        "insert into settlements
             (merchant_id, date, gross_cents, fee_cents, net_cents, txn_count, job_id, snapshot_id)
         select $1, $2::date, 5, 1, 4, 1, $3, coalesce($4, (select max(id) from transactions))",
    )
    .bind(merchant)
    .bind(date)
    .bind(job_id)
    .bind(snapshot)
    .execute(pool)
    .await
    .unwrap();
}

/// A job the release before fixed during a rolling upgrade (its run names no snapshot) and a new
/// worker resumes is as new as its high-water id: it replaces a day an older-release job
/// settled from an older input.
#[tokio::test]
async fn a_run_an_older_release_fixed_is_as_new_as_its_high_water_id() {
    let db = db("UTC", 1, 100).await;
    let rows = support::store_random(&db.pool, 12, 300, 3, 1).await;
    // An older-release job settled the day from the first 100 ids.
    settled_by(&db.pool, "stale", "2025-01-01", 70, Some(100)).await;
    for statement in [
        // The older release fixes job 3 now, with its statements.
        "insert into settlement_runs
             (job_id, from_date, to_date, time_zone, high_water_id, total, fence)
         select 3, '2025-01-01', '2025-01-01', 'UTC', max(id), count(*), 0 from transactions",
        "insert into settlement_parts (job_id, part, lo_id, hi_id, cursor_id, processed)
         select 3, 0, 0, max(id), 0, 0 from transactions",
    ] {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
    let resumed = db.start(3, range("2025-01-01", "2025-01-01")).await;
    db.finalize(&db.batches(&resumed, None).await)
        .await
        .unwrap();
    let expected = reference(&rows, day("2025-01-01"), day("2025-01-01"), Tz::UTC);
    assert_eq!(db.settled("2025-01-01", "2025-01-01").await, expected);
}

#[tokio::test]
async fn rerunning_a_range_gives_identical_rows_and_overlaps_replace() {
    let db = db("UTC", 2, 200).await;
    let rows = support::store_random(&db.pool, 4, 2000, 4, 6).await;
    db.run(1, range("2025-01-01", "2025-01-04")).await;
    let first = db.settled("2025-01-01", "2025-01-04").await;
    // Rows an earlier run left that this one does not produce: inside the range they go,
    // outside it they stay.
    settled_by(&db.pool, "gone", "2025-01-02", 0, Some(0)).await;
    settled_by(&db.pool, "kept", "2024-12-31", 0, Some(0)).await;
    db.run(2, range("2025-01-01", "2025-01-04")).await;
    assert_eq!(db.settled("2025-01-01", "2025-01-04").await, first);
    assert_eq!(
        db.settled("2024-12-31", "2024-12-31")
            .await
            .into_keys()
            .collect::<Vec<_>>(),
        [("kept".to_owned(), day("2024-12-31"))]
    );
    // An overlapping later range replaces the shared days and keeps the others.
    let more = support::store_random(&db.pool, 5, 500, 4, 6).await;
    let path = db.run(3, range("2025-01-03", "2025-01-06")).await;
    let all = [&rows[..], &more[..]].concat();
    assert_eq!(
        csv(&path),
        reference(&all, day("2025-01-03"), day("2025-01-06"), Tz::UTC)
    );
    let expected = days_of(&[
        (&rows, "2025-01-01", "2025-01-02"),
        (&all, "2025-01-03", "2025-01-06"),
    ]);
    assert_eq!(db.settled("2025-01-01", "2025-01-06").await, expected);
}

#[tokio::test]
async fn an_empty_range_writes_a_header_only_and_an_empty_table_works() {
    let db = db("UTC", 2, 100).await;
    let path = db.run(1, range("2025-01-01", "2025-01-31")).await;
    assert_eq!(
        path,
        "merchant_id,date,gross_cents,fee_cents,net_cents,txn_count\n"
    );
    support::store_random(&db.pool, 6, 300, 3, 3).await;
    let path = db.run(2, range("2026-06-01", "2026-06-30")).await;
    assert!(csv(&path).is_empty());
}

#[tokio::test]
async fn days_follow_the_configured_zone_at_the_edges() {
    let rows = vec![
        txn("m", 100, 1, Status::Paid, at("2025-01-01T23:59:59Z")),
        txn("m", 200, 2, Status::Paid, at("2025-01-02T00:00:00Z")),
        // Tokyo is UTC+9: 14:59:59Z is still Jan 1 there, 15:00:00Z is Jan 2.
        txn("m", 400, 4, Status::Paid, at("2025-01-01T14:59:59Z")),
        txn("m", 800, 8, Status::Paid, at("2025-01-01T15:00:00Z")),
        txn("m", 1600, 16, Status::Pending, at("2025-01-01T12:00:00Z")),
    ];
    assert_eq!(
        settled_day("UTC", &rows, "2025-01-01").await,
        (1300, 13, 1287, 3)
    );

    let tokyo = db("Asia/Tokyo", 2, 1).await;
    store(&tokyo.pool, &rows).await;
    let path = tokyo.run(1, range("2025-01-01", "2025-01-02")).await;
    let expected: support::Settled = [
        (("m".to_owned(), day("2025-01-01")), (400, 4, 396, 1)),
        (("m".to_owned(), day("2025-01-02")), (1100, 11, 1089, 3)),
    ]
    .into();
    assert_eq!(csv(&path), expected);
    assert_eq!(
        reference(&rows, day("2025-01-01"), day("2025-01-02"), Tz::Asia__Tokyo),
        expected
    );
    // The zone got its own statistics object, and a day in New York differs again.
    let stats: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_statistic_ext where stxname = 'transactions_merchant_day_asia_tokyo')",
    )
    .fetch_one(&tokyo.pool)
    .await
    .unwrap();
    assert!(stats);
    let new_york = db("America/New_York", 1, 3).await;
    store(&new_york.pool, &rows).await;
    let path = new_york.run(1, range("2024-12-31", "2025-01-01")).await;
    assert_eq!(
        csv(&path),
        reference(
            &rows,
            day("2024-12-31"),
            day("2025-01-01"),
            Tz::America__New_York
        )
    );
}

/// Days whose clocks go back across midnight keep every hour. In Havana the clocks go back from
/// 01:00 to 00:00 on 2025-11-02, so that day's midnight comes twice: its first hour
/// (04:00-05:00Z) belongs to it as well. In St John's they went back at 00:01 on 2010-11-07 to
/// 23:01 of the 6th: the 6th's last hour came again after the 7th's first midnight. In Juneau
/// (1867) they went back a day, so the 19th began a day before its second midnight.
#[tokio::test]
async fn a_day_whose_clocks_go_back_across_midnight_keeps_every_hour() {
    let havana = [
        // Local 23:59:59, then 00:00 and 00:30 before the clocks go back, 00:30 after,
        // 23:59:59, and the next day's midnight.
        "2025-11-02T03:59:59Z",
        "2025-11-02T04:00:00Z",
        "2025-11-02T04:30:00Z",
        "2025-11-02T05:30:00Z",
        "2025-11-03T04:59:59Z",
        "2025-11-03T05:00:00Z",
    ];
    let st_johns = [
        // Noon, 23:30, the first midnight, 23:15 again, the second midnight.
        "2010-11-06T14:30:00Z",
        "2010-11-07T02:00:00Z",
        "2010-11-07T02:30:00Z",
        "2010-11-07T02:45:00Z",
        "2010-11-07T03:30:00Z",
    ];
    let juneau = [
        // On 1867-10-18 (local 10-19, 14:xx) Alaska's clocks went back a whole day: 10-19's
        // first midnight, its first hour, the repeated 10-18's last second, 10-19 again.
        "1867-10-18T08:57:40Z",
        "1867-10-18T08:57:41Z",
        "1867-10-18T10:00:00Z",
        "1867-10-19T08:57:40Z",
        "1867-10-19T10:00:00Z",
    ];
    let days: [(Tz, &[&str], &str, _); 3] = [
        (
            Tz::America__Havana,
            &havana,
            "2025-11-02",
            (3000, 30, 2970, 4),
        ),
        (
            Tz::America__Juneau,
            &juneau,
            "1867-10-19",
            (2200, 22, 2178, 3),
        ),
        (
            Tz::America__St_Johns,
            &st_johns,
            "2010-11-06",
            (1100, 11, 1089, 3),
        ),
    ];
    for (zone, instants, date, sums) in days {
        assert_eq!(settled_paid_day(zone, instants, date).await, sums, "{zone}");
    }
}

/// Settles a PAID row of merchant `m` at each of `instants` (the i-th of 100 << i cents, fee
/// 1 << i) over the one day `date` in `zone` ([`settled_day`]); the day's sums, which the
/// reference computed in Rust must agree with.
async fn settled_paid_day(zone: Tz, instants: &[&str], date: &str) -> (i64, i64, i64, i64) {
    let rows: Vec<_> = (0..)
        .zip(instants)
        .map(|(i, paid_at)| txn("m", 100 << i, 1 << i, Status::Paid, at(paid_at)))
        .collect();
    let sums = settled_day(zone.name(), &rows, date).await;
    let expected: support::Settled = [(("m".to_owned(), day(date)), sums)].into();
    assert_eq!(reference(&rows, day(date), day(date), zone), expected);
    sums
}

/// Settles `rows` of merchant `m` over the one day `date` in `zone`, in a database of its own
/// (two parts, one-row batches); the day's `(gross, fee, net, count)` in the job's CSV, which
/// must hold that day's row alone.
async fn settled_day(zone: &str, rows: &[NewTransaction], date: &str) -> (i64, i64, i64, i64) {
    let db = db(zone, 2, 1).await;
    store(&db.pool, rows).await;
    let settled = csv(&db.run(1, range(date, date)).await);
    let keys: Vec<_> = settled.keys().cloned().collect();
    assert_eq!(keys, [("m".to_owned(), day(date))]);
    settled[&("m".to_owned(), day(date))]
}

#[tokio::test]
async fn an_overflowing_sum_fails_and_leaves_settlements_as_they_were() {
    // Batches of one row: each batch fits, the total does not.
    let db = db("UTC", 1, 1).await;
    store(
        &db.pool,
        &[txn("m", 5, 1, Status::Paid, at("2025-01-01T10:00:00Z"))],
    )
    .await;
    db.run(1, range("2025-01-01", "2025-01-01")).await;
    let before = db.settled("2025-01-01", "2025-01-01").await;
    let huge = i64::MAX / 2 + 1;
    store(
        &db.pool,
        &[
            txn("m", huge, 0, Status::Paid, at("2025-01-01T11:00:00Z")),
            txn("m", huge, 0, Status::Paid, at("2025-01-01T12:00:00Z")),
        ],
    )
    .await;
    let plan = db.start(2, range("2025-01-01", "2025-01-01")).await;
    // Posted after the input was fixed (ids above its mark): not the job's, whatever they sum to.
    store(
        &db.pool,
        &[
            txn("late", huge, 0, Status::Paid, at("2025-01-01T13:00:00Z")),
            txn("late", huge, 0, Status::Paid, at("2025-01-01T14:00:00Z")),
        ],
    )
    .await;
    // A batch over the whole span, holding both rows, already overflows (and commits nothing).
    let whole = plan::Part {
        hi_id: plan.parts.last().unwrap().hi_id,
        ..plan.parts[0].clone()
    };
    let mut tx = db.pool.begin().await.unwrap();
    let both = parts::process_batch(&mut tx, &plan, &whole, 10).await;
    assert!(matches!(both, Err(SettleError::Overflow)), "{both:?}");
    drop(tx);
    // One row per batch: the part's fold (or the finalize) finds the total does not fit.
    assert!(matches!(
        db.run_until_error(&plan).await,
        Some(SettleError::Overflow)
    ));
    // What the job's error names: the input's merchant-day, its sums summed exactly.
    let mut conn = db.pool.acquire().await.unwrap();
    let found = overflow::find(&mut conn, &plan, overflow::LISTED)
        .await
        .unwrap();
    let named = overflow::Overflowing {
        merchant_id: "m".to_owned(),
        date: day("2025-01-01"),
        sums: vec!["gross_cents".to_owned(), "net_cents".to_owned()],
        found: 1,
    };
    assert_eq!(found, [named]);
    finalize::delete_working_rows(&mut conn, 2, None)
        .await
        .unwrap();
    assert_eq!(db.settled("2025-01-01", "2025-01-01").await, before);
    let results = common::scalar(
        &db.pool,
        "select count(*) from settlement_results where job_id = 2",
    )
    .await;
    assert_eq!(results, 0);
}

/// Rows that are not PAID are read and counted (`run` checks the count) but never summed into
/// a result, so their amounts cannot overflow one (a batch groups them apart, see
/// `parts::aggregate_ids`).
#[tokio::test]
async fn amounts_of_rows_not_paid_never_reach_the_sums() {
    let db = db("UTC", 1, 10).await;
    let huge = i64::MAX / 2 + 1;
    let rows = [
        txn("m", 5, 1, Status::Paid, at("2025-01-01T10:00:00Z")),
        txn("m", huge, 0, Status::Failed, at("2025-01-01T11:00:00Z")),
        txn("m", huge, 0, Status::Refunded, at("2025-01-01T12:00:00Z")),
    ];
    store(&db.pool, &rows).await;
    let path = db.run(1, range("2025-01-01", "2025-01-01")).await;
    let expected = reference(&rows, day("2025-01-01"), day("2025-01-01"), Tz::UTC);
    assert_eq!(expected.len(), 1);
    assert_eq!(csv(&path), expected);
}

#[tokio::test]
async fn stale_statistics_are_refreshed_before_the_input_is_fixed() {
    let db = db("UTC", 1, 100).await;
    support::store_random(&db.pool, 7, 20_000, 3, 2).await;
    let mut conn = db.pool.acquire().await.unwrap();
    // The activity counters are flushed asynchronously; wait until they show the load.
    for _ in 0..50 {
        let (modified, _) = settle::settlement::input::transaction_statistics_age(&mut conn)
            .await
            .unwrap();
        if modified >= 20_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        plan::refresh_statistics(&mut conn, db.settings.zone)
            .await
            .unwrap()
    );
    assert!(
        !plan::refresh_statistics(&mut conn, db.settings.zone)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_new_claim_shuts_out_the_former_owners_batches() {
    let db = db("UTC", 2, 10).await;
    support::store_random(&db.pool, 8, 100, 2, 2).await;
    let range = range("2025-01-01", "2025-01-02");
    let bounds = plan::high_water_mark(&db.pool).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    plan::start(&mut tx, 5, range, &db.settings, 1, Some(bounds.clone()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The former owner is mid-batch (holding its share lock) when the job is claimed again.
    let mut old = db.pool.begin().await.unwrap();
    assert!(parts::lock_run(&mut old, 5, 1).await.unwrap());
    let pool = db.pool.clone();
    let settings = db.settings.clone();
    let reclaim = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        plan::start(&mut tx, 5, range, &settings, 2, Some(bounds))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !reclaim.is_finished(),
        "the new owner waits for the batch in flight"
    );
    old.commit().await.unwrap();
    reclaim.await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(!parts::lock_run(&mut conn, 5, 1).await.unwrap());
    assert!(parts::lock_run(&mut conn, 5, 2).await.unwrap());
}

/// A fresh start (a retried job) deletes the job's earlier working rows while a former owner,
/// whose lease ran out, is mid-batch: the start waits for that batch, and its rows go as well,
/// so the new run cannot sum them a second time.
#[tokio::test]
async fn a_fresh_start_also_deletes_the_batch_a_former_owner_lands_meanwhile() {
    let db = db("UTC", 1, 10).await;
    support::store_random(&db.pool, 8, 100, 2, 2).await;
    let plan = db.start(5, range("2025-01-01", "2025-01-02")).await;
    let mut old = db.pool.begin().await.unwrap();
    assert!(parts::lock_run(&mut old, 5, 0).await.unwrap());
    parts::process_batch(&mut old, &plan, &plan.parts[0], 10)
        .await
        .unwrap();
    let pool = db.pool.clone();
    let fresh = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        finalize::delete_working_rows(&mut tx, 5, None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
    common::wait_for_lock_waiter(&db.pool, "delete from settlement_runs").await;
    old.commit().await.unwrap();
    fresh.await.unwrap();
    support::assert_no_working_rows(&db.pool, 5).await;
}

/// A holder whose lease ran out discards its work under its own fence: the run its successor
/// resumed (now under the successor's fence) stays, and the successor's discard deletes it.
#[tokio::test]
async fn a_discard_under_a_former_claims_fence_leaves_the_successors_run() {
    let db = db("UTC", 1, 10).await;
    support::store_random(&db.pool, 8, 100, 2, 2).await;
    let range = range("2025-01-01", "2025-01-02");
    let plan = db.start(5, range).await;
    let mut tx = db.pool.begin().await.unwrap();
    plan::start(&mut tx, 5, range, &db.settings, 1, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let stale = finalize::delete_working_rows(&mut conn, 5, Some(0)).await;
    assert!(!stale.unwrap());
    // The run and its parts, untouched.
    let runs = support::rows_of_job(&db.pool, "settlement_runs", 5).await;
    let parts = support::rows_of_job(&db.pool, "settlement_parts", 5).await;
    assert_eq!((runs, parts), (1, plan.parts.len() as i64));
    let current = finalize::delete_working_rows(&mut conn, 5, Some(1)).await;
    assert!(current.unwrap());
    support::assert_no_working_rows(&db.pool, 5).await;
}

#[tokio::test]
async fn gaps_in_the_ids_are_skipped_and_counted_right() {
    let db = db("UTC", 2, 10).await;
    let rows = support::random_transactions(9, 60, 3, 2);
    // Three clusters of ids far apart: most id-range batches are empty.
    for (i, row) in rows.iter().enumerate() {
        let id = 1 + (i as i64 / 20) * 5_000_000 + i as i64;
        sqlx::query(
            "insert into transactions
                 (id, merchant_id, external_id, amount_cents, fee_cents, status, paid_at)
             values ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(&row.merchant_id)
        .bind(&row.external_id)
        .bind(row.amount_cents)
        .bind(row.fee_cents)
        .bind(row.status.as_str())
        .bind(row.paid_at)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let started = std::time::Instant::now();
    let path = db.run(1, range("2025-01-01", "2025-01-02")).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(
        csv(&path),
        reference(&rows, day("2025-01-01"), day("2025-01-02"), Tz::UTC)
    );
}

#[tokio::test]
async fn an_insert_in_flight_below_the_high_water_mark_is_waited_for() {
    let db = db("UTC", 2, 10).await;
    let rows = support::random_transactions(10, 2, 1, 1);
    // The first insert draws the lower id and stays open; the second commits a higher one.
    let mut open = db.pool.begin().await.unwrap();
    support::insert(&mut open, &rows[..1]).await;
    store(&db.pool, &rows[1..]).await;
    let pool = db.pool.clone();
    let bounds = tokio::spawn(async move { plan::high_water_mark(&pool).await.unwrap() });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !bounds.is_finished(),
        "the high-water mark waits for the insert in flight"
    );
    open.commit().await.unwrap();
    let bounds = bounds.await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let plan = plan::start(
        &mut tx,
        1,
        range("2024-12-31", "2025-01-02"), // every day the rows may fall on
        &db.settings,
        0,
        Some(bounds),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(plan.run.total, 2, "the total counts the row committed late");
    let plan = db.batches(&plan, None).await;
    assert_eq!(plan.processed(), 2);
    let path = db.finalize(&plan).await.unwrap();
    assert_eq!(
        csv(&path),
        reference(&rows, day("2024-12-31"), day("2025-01-02"), Tz::UTC)
    );
}
