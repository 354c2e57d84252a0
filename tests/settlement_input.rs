//! How a settlement job fixes its input. A range holding the history's first and last rows
//! takes its id span from the primary key's two ends and counts its rows as it reads them: its
//! `total` bounds the count (the span's ids) until the job completes with the exact count. Any
//! other range takes its span from the quarter-hour index, also counted as it is read, its
//! `total` bounded by the quarter hours' ids (rows posted late counted one by one); in a zone
//! whose midnight is off the quarter hours, through the `(paid_at, id)` index, which counts it
//! up front. The input is then cut into parts, which the job's runners take in turn and stop
//! together when one of them fails.

mod common;

use chrono_tz::Tz;
use common::TestApp;
use common::ops::settling_app;
use common::processes::wait_state;
use common::settlement as support;
use serde_json::json;
use settle::settlement::plan::{self, Plan};
use settle::settlement::transactions::{NewTransaction, Status};
use settle::settlement::{DateRange, Settings, Zone};
use sqlx::PgPool;
use support::{at, day, txn};

/// Stored in id order: one row paid on 01-01 (the lowest id), `middle` rows alternating
/// between 01-02 and 01-09, and one paid on 01-03 (the highest id).
fn history(middle: usize) -> Vec<NewTransaction> {
    let mut rows = vec![txn("m1", 100, 1, Status::Paid, at("2025-01-01T08:00:00Z"))];
    rows.extend((0..middle).map(|i| {
        let paid_at = if i % 2 == 0 {
            "2025-01-02T12:00:00Z"
        } else {
            "2025-01-09T12:00:00Z"
        };
        txn("m2", 10 + i as i64, 1, Status::Paid, at(paid_at))
    }));
    rows.push(txn("m3", 300, 3, Status::Paid, at("2025-01-03T20:00:00Z")));
    rows
}

/// The plan a first start fixes for `from..=to`, rolled back (no job holds it).
async fn fixed_input(pool: &PgPool, settings: &Settings, from: &str, to: &str) -> Plan {
    let range = DateRange::new(day(from), day(to), 366).unwrap();
    let high_water = plan::high_water_mark(pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let plan = plan::start(&mut tx, 1, range, settings, 0, Some(high_water))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    plan
}

/// Queues a settlement of `from..=to` through the API; returns its id once COMPLETED.
async fn settled(app: &TestApp, from: &str, to: &str) -> i64 {
    let (status, body) = app
        .post("/api/v1/jobs/settlement", &json!({"from": from, "to": to}))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_i64().unwrap();
    wait_state(&app.pool, id, "completed").await;
    id
}

/// `(status, processed, total)` of a finished job.
async fn ending(pool: &PgPool, id: i64) -> (String, i64, Option<i64>) {
    sqlx::query_as("select state::text, processed, total from all_jobs where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_holding_both_ends_is_counted_as_it_is_read() {
    let (app, _worker) = settling_app(7, 2).await;
    let rows = history(40);
    support::store(&app.pool, &rows).await;
    let within = support::paid_within(&rows, "2025-01-01", "2025-01-03", Tz::UTC);
    assert_eq!(within, 22, "the first, the last and every other middle row");

    let settings = Settings::new(&app.config.settlement, 7);
    let plan = fixed_input(&app.pool, &settings, "2025-01-01", "2025-01-03").await;
    // No count up front: the total is the span's ids, every stored row here.
    assert_eq!(plan.run.total, rows.len() as i64);
    assert_eq!(
        plan.parts.first().unwrap().lo_id + 1,
        first_id(&app.pool).await
    );

    let id = settled(&app, "2025-01-01", "2025-01-03").await;
    // The completion records what the job read: the exact count.
    assert_eq!(
        ending(&app.pool, id).await,
        ("completed".to_owned(), within, Some(within))
    );
    let (_, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(
        (job["progress"].as_i64(), job["total"].as_i64()),
        (Some(100), Some(within))
    );
}

/// Stores, and returns, more than `input::EDGE_ROWS` rows paid 13 days before `day` (the
/// lowest ids), 40 rows alternating between `day` and `other`, then as many paid 18 days after
/// `day` (the highest ids): a range holding `day` but neither end finds its span in the middle
/// of the table.
async fn store_padded(pool: &PgPool, day: &str, other: &str) -> Vec<NewTransaction> {
    let day = at(day);
    let row = |i: usize, paid_at| txn("m1", 10 + i as i64, 1, Status::Paid, paid_at);
    let mut rows: Vec<_> = (0..1_100)
        .map(|i| row(i, day - chrono::Days::new(13)))
        .collect();
    rows.extend((0..40).map(|i| row(i, if i % 2 == 0 { day } else { at(other) })));
    rows.extend((0..1_100).map(|i| row(i, day + chrono::Days::new(18))));
    // Ingestion inserts in (merchant, external id) order: these ids follow the list's.
    for (i, row) in rows.iter_mut().enumerate() {
        row.external_id = format!("ch_{i:06}");
    }
    support::store(pool, &rows).await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_in_the_middle_takes_its_span_from_the_quarter_hours() {
    let (app, _worker) = settling_app(7, 2).await;
    let rows = store_padded(&app.pool, "2025-01-02T23:59:59Z", "2025-01-09T00:00:00Z").await;
    let within = support::paid_within(&rows, "2025-01-02", "2025-01-02", Tz::UTC);
    assert_eq!(within, 20);
    let settings = Settings::new(&app.config.settlement, 7);
    let plan = fixed_input(&app.pool, &settings, "2025-01-02", "2025-01-02").await;
    // The day's rows all lie in its last quarter hour, whose rows above its first id are
    // counted through the index: the total is theirs, not the span's 39 ids (the 01-09 rows
    // between them included).
    assert_eq!(plan.run.total, 20);
    let first_of_day = first_id(&app.pool).await + 1_100;
    assert_eq!(plan.parts.first().unwrap().lo_id, first_of_day - 1);

    let id = settled(&app, "2025-01-02", "2025-01-02").await;
    assert_eq!(
        ending(&app.pool, id).await,
        ("completed".to_owned(), within, Some(within))
    );
}

/// The day's rows inside each part's id range.
async fn rows_per_part(pool: &PgPool, plan: &Plan, day: &str) -> Vec<i64> {
    let mut counts = Vec::new();
    for part in &plan.parts {
        let rows: i64 = sqlx::query_scalar(
            "select count(*) from transactions
             where id > $1 and id <= $2 and (paid_at at time zone 'UTC')::date = $3::date",
        )
        .bind(part.lo_id)
        .bind(part.hi_id)
        .bind(day)
        .fetch_one(pool)
        .await
        .unwrap();
        counts.push(rows);
    }
    counts
}

/// Stores 1,100 rows of an earlier day (the lowest ids, so a range of `day` takes its span
/// from the quarter hours), the rows paid at `day`'s instants in that order, 1,100 rows of a
/// later day, and one more row of 2025-01-02's noon, posted late (the highest id); returns all
/// but the earlier day's.
async fn store_day_then_late_row(
    pool: &PgPool,
    day: impl Iterator<Item = chrono::DateTime<chrono::Utc>>,
    late: &str,
) -> Vec<NewTransaction> {
    let mut rows: Vec<_> = day
        .chain((0..1_100).map(|_| at("2025-01-20T12:00:00Z")))
        .chain([at(late)])
        .enumerate()
        .map(|(i, paid_at)| txn("m1", 10 + i as i64, 1, Status::Paid, paid_at))
        .collect();
    for (i, row) in rows.iter_mut().enumerate() {
        row.external_id = format!("ch_{i:06}");
    }
    let early = (0..1_100).map(|_| txn("m0", 5, 1, Status::Paid, at("2024-12-20T12:00:00Z")));
    support::store(pool, &early.collect::<Vec<_>>()).await;
    support::store(pool, &rows).await;
    rows
}

/// A row every five minutes of 2025-01-02 (three in each quarter hour, in time order) and the
/// late row, as [`store_day_then_late_row`] stores them: 289 rows of the day over 1,389 ids.
async fn store_five_minute_day(pool: &PgPool) -> Vec<NewTransaction> {
    let midnight = at("2025-01-02T00:00:00Z");
    let day = (0..288).map(|i| midnight + chrono::Duration::minutes(5 * i));
    store_day_then_late_row(pool, day, "2025-01-02T12:01:00Z").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_stretched_by_a_late_row_is_cut_into_parts_by_input() {
    let (app, _worker) = settling_app(50, 3).await;
    store_five_minute_day(&app.pool).await;

    // Where a runner's third of the input fits in a batch, the parts are the three thirds.
    let settings = Settings::new(&app.config.settlement, 100);
    let plan = fixed_input(&app.pool, &settings, "2025-01-02", "2025-01-02").await;
    // The late row adds one to the bound, not the 1,100 ids it stretches the span over.
    assert_eq!(plan.run.total, 289);
    // Cut by width, the first part would hold all 288 rows before the later day's.
    let counts = rows_per_part(&app.pool, &plan, "2025-01-02").await;
    assert_eq!(counts.iter().sum::<i64>(), 289);
    assert!(counts.iter().all(|n| (90..=102).contains(n)), "{counts:?}");

    // A third of two batches is cut into parts of 6, 2 and 1 ninths, the large ones first.
    let settings = Settings::new(&app.config.settlement, 50);
    let plan = fixed_input(&app.pool, &settings, "2025-01-02", "2025-01-02").await;
    let counts = rows_per_part(&app.pool, &plan, "2025-01-02").await;
    let shares = [6, 6, 6, 2, 2, 2, 1, 1, 1].map(|weight| 289 * weight / 27);
    assert_eq!(counts.len(), shares.len());
    let near = counts
        .iter()
        .zip(shares)
        .all(|(n, share)| (n - share).abs() <= 4);
    assert!(near, "{counts:?} against {shares:?}");

    let id = settled(&app, "2025-01-02", "2025-01-02").await;
    assert_eq!(
        ending(&app.pool, id).await,
        ("completed".to_owned(), 289, Some(289))
    );
}

/// Records each batch sum as it lands (`landed`: the order, the part and the job's attempt).
/// With `trip`, part 0's first batch fails, once (a sequence is not rolled back with it).
async fn record_landed(pool: &PgPool, trip: bool) {
    let first_trip = if trip { 1 } else { 2 };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table landed (n serial primary key, part int not null, attempt int not null);
         create sequence trips start {first_trip};
         create function record_landed() returns trigger language plpgsql as $$
             begin
                 if new.part = 0 and not exists (select from landed where part = 0)
                         and nextval('trips') = 1 then
                     raise exception 'part 0 fails';
                 end if;
                 insert into landed (part, attempt)
                     select new.part, attempt from jobs where id = new.job_id;
                 return new;
             end $$;
         create trigger record_landed after insert on settlement_batches
             for each row execute function record_landed();"
    )))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_runner_takes_the_parts_in_turn() {
    let (app, _worker) = settling_app(10, 1).await;
    // 289 rows: a share of 29 batches for the one runner, cut into parts of 6, 2 and 1 ninths.
    store_five_minute_day(&app.pool).await;
    record_landed(&app.pool, false).await;

    let id = settled(&app, "2025-01-02", "2025-01-02").await;
    assert_eq!(ending(&app.pool, id).await.1, 289);
    let landed: Vec<i32> = sqlx::query_scalar("select part from landed order by n")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    // Run side by side, the parts' batches would interleave.
    let mut in_turn = landed.clone();
    in_turn.sort_unstable();
    in_turn.dedup();
    assert_eq!(in_turn, [0, 1, 2]);
    assert!(landed.is_sorted(), "{landed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_part_stops_the_others_before_their_next_batch() {
    let (app, _worker) = settling_app(5, 2).await;
    // Two runners' shares of 289 rows cut into parts of 6, 2 and 1 ninths: 96, 96, 32, 32, 16
    // and 16 rows, parts 0 and 1 taken first.
    let rows = store_five_minute_day(&app.pool).await;
    record_landed(&app.pool, true).await;

    // Part 0's first batch fails the attempt; the next attempt resumes and completes exactly.
    let id = settled(&app, "2025-01-02", "2025-01-02").await;
    assert_eq!(ending(&app.pool, id).await.1, 289);
    let (from, to) = (day("2025-01-02"), day("2025-01-02"));
    let expected = support::reference(&rows, from, to, Tz::UTC);
    assert_eq!(support::settlements(&app.pool, from, to).await, expected);
    let in_failed_attempt: Vec<i32> =
        sqlx::query_scalar("select part from landed where attempt = 1")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let part_one: i64 = sqlx::query_scalar("select count(*) from landed where part = 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // Left running, the other runner would have gone on through part 1 and the parts after
    // it; stopped, it ends part 1 early.
    assert!(
        in_failed_attempt.iter().all(|&part| part == 1),
        "{in_failed_attempt:?}"
    );
    assert!(
        (in_failed_attempt.len() as i64) < part_one,
        "{in_failed_attempt:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_posted_late_keep_the_total_a_bound_near_the_count() {
    let (app, _worker) = settling_app(50, 3).await;
    // In id order, each quarter hour's three rows, then one of the quarter hour before it
    // (posted a few minutes late).
    let midnight = at("2025-01-02T00:00:00Z");
    let minutes = |m: i64| midnight + chrono::Duration::minutes(m);
    let day = (0..96).flat_map(|q| {
        let on_time = [1, 6, 11].map(|m| minutes(15 * q + m));
        on_time
            .into_iter()
            .chain((q > 0).then(|| minutes(15 * q - 1)))
    });
    let rows = store_day_then_late_row(&app.pool, day, "2025-01-02T12:01:00Z").await;
    let within = support::paid_within(&rows, "2025-01-02", "2025-01-02", Tz::UTC);
    assert_eq!(within, 96 * 3 + 95 + 1);

    let settings = Settings::new(&app.config.settlement, 50);
    let plan = fixed_input(&app.pool, &settings, "2025-01-02", "2025-01-02").await;
    // Never below the count (progress stays within it), far below the span's 1,484 ids.
    let total = plan.run.total;
    assert!((within..=2 * within).contains(&total), "{total}");
    let id = settled(&app, "2025-01-02", "2025-01-02").await;
    assert_eq!(
        ending(&app.pool, id).await,
        ("completed".to_owned(), within, Some(within))
    );
}

/// A row posted late into the range's last quarter hour (the one whose first id is the
/// highest) adds one to the bound too: the bound took that quarter hour's last id as the end
/// of the on-time ids, and counted every id up to the late row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_posted_late_into_the_last_quarter_hour_adds_one_to_the_total() {
    let (app, _worker) = settling_app(50, 3).await;
    let midnight = at("2025-01-02T00:00:00Z");
    let day = (0..288).map(|i| midnight + chrono::Duration::minutes(5 * i));
    store_day_then_late_row(&app.pool, day, "2025-01-02T23:59:59.999999Z").await;
    let settings = Settings::new(&app.config.settlement, 100);
    let plan = fixed_input(&app.pool, &settings, "2025-01-02", "2025-01-02").await;
    assert_eq!(plan.run.total, 289);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_whose_midnight_is_off_the_quarter_hours_is_counted_up_front() {
    let (app, _worker) = settling_app(7, 2).await;
    // Liberia kept Monrovia mean time, UTC-00:44:30, until 1972: its 1971-01-02 began at
    // 00:44:30 UTC. The row paid at 00:30 UTC belongs to the 1st there.
    let rows = store_padded(&app.pool, "1971-01-02T12:00:00Z", "1971-01-02T00:30:00Z").await;
    let monrovia: Tz = "Africa/Monrovia".parse().unwrap();
    let within = support::paid_within(&rows, "1971-01-02", "1971-01-02", monrovia);
    let settings = Settings {
        zone: Zone::parse("Africa/Monrovia").unwrap(),
        ..Settings::new(&app.config.settlement, 7)
    };
    let plan = fixed_input(&app.pool, &settings, "1971-01-02", "1971-01-02").await;
    assert_eq!((plan.run.total, within), (20, 20));
}

async fn first_id(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select min(id) from transactions")
        .fetch_one(pool)
        .await
        .unwrap()
}
