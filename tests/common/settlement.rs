//! For the settlement tests: random transactions, the reference settlement computed in Rust
//! from the rows the test generated, readers of the results, and the steps several tests share.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use settle::settlement::transactions::{Ingested, NewTransaction, Status, ingest};
use sqlx::PgPool;

/// `(merchant_id, date) → (gross, fee, net, count)`, as a settlement row or CSV line holds it.
pub type Settled = BTreeMap<(String, NaiveDate), (i64, i64, i64, i64)>;

pub fn day(s: &str) -> NaiveDate {
    s.parse().expect("YYYY-MM-DD")
}

pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

pub fn txn(
    merchant: &str,
    amount: i64,
    fee: i64,
    status: Status,
    paid_at: DateTime<Utc>,
) -> NewTransaction {
    NewTransaction {
        merchant_id: merchant.to_owned(),
        // A fresh provider id: every generated transaction is a distinct payment.
        external_id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
        amount_cents: amount,
        fee_cents: fee,
        status,
        paid_at,
    }
}

/// `n` transactions over `merchants` merchants and `days` days from 2025-01-01 UTC (plus a
/// margin of a day on each side, to exercise the range filter), all statuses, seeded.
pub fn random_transactions(seed: u64, n: usize, merchants: u32, days: i64) -> Vec<NewTransaction> {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = at("2024-12-31T00:00:00Z");
    let statuses = [
        Status::Paid,
        Status::Paid,
        Status::Paid,
        Status::Pending,
        Status::Failed,
        Status::Refunded,
    ];
    (0..n)
        .map(|_| {
            let amount = rng.random_range(0..100_000);
            let seconds = rng.random_range(0..(days + 2) * 86_400);
            txn(
                &format!("m{:03}", rng.random_range(0..merchants)),
                amount,
                rng.random_range(0..=amount),
                statuses[rng.random_range(0..statuses.len())],
                start + Duration::seconds(seconds),
            )
        })
        .collect()
}

/// Stores `rows` in chunks (one ingestion each, like the API does).
pub async fn store(pool: &PgPool, rows: &[NewTransaction]) {
    let mut conn = pool.acquire().await.unwrap();
    for chunk in rows.chunks(1000) {
        insert(&mut conn, chunk).await;
    }
}

/// Stores [`random_transactions`]`(seed, n, merchants, days)` and returns them: a test's input,
/// in the database and at hand for its reference.
pub async fn store_random(
    pool: &PgPool,
    seed: u64,
    n: usize,
    merchants: u32,
    days: i64,
) -> Vec<NewTransaction> {
    let rows = random_transactions(seed, n, merchants, days);
    store(pool, &rows).await;
    rows
}

/// Ingests `rows` on `conn` (inside the caller's transaction, if it opened one): all are new.
pub async fn insert(conn: &mut sqlx::PgConnection, rows: &[NewTransaction]) {
    let ingested = ingest(conn, rows).await.unwrap();
    assert_eq!(
        ingested,
        Ingested::Stored {
            inserted: rows.len() as u64,
            duplicates: 0
        }
    );
}

/// How many of `rows` were paid within the days `from..=to` of `zone`: a job's `total`.
pub fn paid_within(rows: &[NewTransaction], from: &str, to: &str, zone: Tz) -> i64 {
    let days = day(from)..=day(to);
    rows.iter()
        .filter(|t| days.contains(&t.paid_at.with_timezone(&zone).date_naive()))
        .count() as i64
}

/// What `settlements` must hold for 2025-01-01..=04 (UTC) after job A settled those days from
/// `old` and job B, with the newer input `old` + `new`, settled 01-02..=03, in either order:
/// the newest input's rows where B covered, A's elsewhere. Also returns B's rows alone.
pub fn newest_wins(old: &[NewTransaction], new: &[NewTransaction]) -> (Settled, Settled) {
    let all: Vec<_> = old.iter().chain(new).cloned().collect();
    let newest = reference(&all, day("2025-01-02"), day("2025-01-03"), Tz::UTC);
    assert_ne!(
        reference(old, day("2025-01-02"), day("2025-01-03"), Tz::UTC),
        newest,
        "the inputs must differ for the test to mean anything"
    );
    let mut expected = reference(old, day("2025-01-01"), day("2025-01-01"), Tz::UTC);
    expected.extend(newest.clone());
    expected.extend(reference(
        old,
        day("2025-01-04"),
        day("2025-01-04"),
        Tz::UTC,
    ));
    (expected, newest)
}

/// The expected settlement of `rows` for `from..=to` in `zone`, computed without SQL.
pub fn reference(rows: &[NewTransaction], from: NaiveDate, to: NaiveDate, zone: Tz) -> Settled {
    let mut out = Settled::new();
    for row in rows.iter().filter(|r| r.status == Status::Paid) {
        let date = zone
            .from_utc_datetime(&row.paid_at.naive_utc())
            .date_naive();
        if date < from || date > to {
            continue;
        }
        let entry = out.entry((row.merchant_id.clone(), date)).or_default();
        entry.0 += row.amount_cents;
        entry.1 += row.fee_cents;
        entry.2 += row.amount_cents - row.fee_cents;
        entry.3 += 1;
    }
    out
}

/// The `settlements` rows with dates in `from..=to`.
pub async fn settlements(pool: &PgPool, from: NaiveDate, to: NaiveDate) -> Settled {
    let query = sqlx::query_as(
        "select merchant_id, date, gross_cents, fee_cents, net_cents, txn_count
         from settlements where date between $1 and $2",
    );
    fetch_settled(pool, query.bind(from).bind(to)).await
}

/// A settlement row.
type SettledRow = (String, NaiveDate, i64, i64, i64, i64);

/// The rows `query` selects, as [`Settled`].
async fn fetch_settled(
    pool: &PgPool,
    query: sqlx::query::QueryAs<'_, sqlx::Postgres, SettledRow, sqlx::postgres::PgArguments>,
) -> Settled {
    let rows = query.fetch_all(pool).await.unwrap();
    rows.into_iter()
        .map(|(m, d, g, f, n, c)| ((m, d), (g, f, n, c)))
        .collect()
}

/// Parses a settlement CSV, checking its header and that lines are sorted by merchant, date.
pub fn parse_csv(text: &str) -> Settled {
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("merchant_id,date,gross_cents,fee_cents,net_cents,txn_count")
    );
    let mut out = Settled::new();
    let mut last: Option<(String, NaiveDate)> = None;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 6, "{line}");
        let key = (f[0].to_owned(), day(f[1]));
        assert!(last.as_ref().is_none_or(|l| *l < key), "unsorted at {line}");
        last = Some(key.clone());
        let n = |i: usize| f[i].parse::<i64>().expect("integer cents");
        out.insert(key, (n(2), n(3), n(4), n(5)));
    }
    out
}

pub use super::scalar;

/// How many rows of `table` belong to job `id` (its results, parts, batches…).
pub async fn rows_of_job(pool: &PgPool, table: &str, id: i64) -> i64 {
    scalar(
        pool,
        &format!("select count(*) from {table} where job_id = {id}"),
    )
    .await
}

/// (processed, total) of a job.
pub async fn progress(pool: &PgPool, id: i64) -> (i64, Option<i64>) {
    super::processes::job_row(pool, id, "processed, total").await
}

/// Asserts a settlement job that ended without completing (cancelled, or failed for good) left
/// nothing behind: no result, no stored CSV, no working rows.
pub async fn assert_left_nothing(pool: &PgPool, id: i64) {
    let (result,): (Option<serde_json::Value>,) =
        super::processes::job_row(pool, id, "result").await;
    assert_eq!(result, None, "no result");
    let results = rows_of_job(pool, "settlement_results", id).await;
    assert_eq!(results, 0, "no CSV");
    assert_no_working_rows(pool, id).await;
}

/// Stores `rows`, settles `from..=to` through the API (a worker must be running) and returns
/// the `settlements` rows the job left, checked against the reference: rows that a later job
/// must keep or replace.
async fn settle_first(
    app: &super::TestApp,
    rows: &[NewTransaction],
    (from, to): (NaiveDate, NaiveDate),
) -> Settled {
    store(&app.pool, rows).await;
    let id = app
        .post_settlement(&from.to_string(), &to.to_string())
        .await;
    super::processes::wait_state(&app.pool, id, "completed").await;
    let settled = settlements(&app.pool, from, to).await;
    assert!(!settled.is_empty());
    assert_eq!(settled, reference(rows, from, to, Tz::UTC));
    settled
}

/// The days 2025-01-01 to 2025-01-03 settled once over `first` random rows (seed, count), then
/// `more` random rows stored that a later job over those days must fold in (checked: they change
/// the result). Returns the `settlements` rows of the first job and every row stored.
pub async fn settled_then_more(
    app: &super::TestApp,
    first: (u64, usize),
    more: (u64, usize),
    merchants: u32,
) -> (Settled, Vec<NewTransaction>) {
    let days = (day("2025-01-01"), day("2025-01-03"));
    let first = random_transactions(first.0, first.1, merchants, 3);
    let before = settle_first(app, &first, days).await;
    let more = store_random(&app.pool, more.0, more.1, merchants, 3).await;
    let all: Vec<_> = first.into_iter().chain(more).collect();
    assert_ne!(reference(&all, days.0, days.1, Tz::UTC), before);
    (before, all)
}

/// Job `id`'s CSV through `/downloads`, parsed; asserts it is served.
pub async fn downloaded(app: &super::TestApp, id: i64) -> Settled {
    let response = app
        .http
        .get(app.url(&format!("/downloads/{id}.csv")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "job {id}'s CSV");
    parse_csv(&response.text().await.unwrap())
}

/// Leaves working rows of settlement job `id` as a run that gave up mid-way would: a run fixed
/// on old input, a part half done, and sums of a merchant (`m-ghost`) that does not exist.
pub async fn leave_working_rows(pool: &PgPool, id: i64) {
    for statement in [
        "insert into settlement_runs (job_id, from_date, to_date, time_zone, high_water_id, total)
         values ($1, '2025-01-01', '2025-01-02', 'UTC', 10, 10)",
        "insert into settlement_parts (job_id, part, lo_id, hi_id, cursor_id, processed)
         values ($1, 0, 0, 10, 5, 5)",
        "insert into settlement_batches (job_id, part, end_id, scanned, merchant_ids, dates,
             gross_cents, fee_cents, txn_counts)
         values ($1, 0, 5, 5, '{m-ghost}', '{2025-01-01}', '{100}', '{1}', '{5}')",
    ] {
        sqlx::query(statement).bind(id).execute(pool).await.unwrap();
    }
}

/// Asserts job `id` has no working rows left (run, parts, batch sums).
pub async fn assert_no_working_rows(pool: &PgPool, id: i64) {
    for table in ["settlement_runs", "settlement_parts", "settlement_batches"] {
        let left = rows_of_job(pool, table, id).await;
        assert_eq!(left, 0, "{table} rows of job {id} remain");
    }
}

/// The settlement of the days `from..=to` in `zone` straight from the rows of `transactions` up
/// to `input` (an id) as they stand (PAID rows grouped by merchant and local day, in SQL): what
/// a job of that input that read the table's final state settles.
pub async fn settled_now(
    pool: &PgPool,
    (from, to): (NaiveDate, NaiveDate),
    zone: Tz,
    input: i64,
) -> Settled {
    let query = sqlx::query_as(
        "select merchant_id, day, sum(amount_cents)::int8, sum(fee_cents)::int8,
                sum(amount_cents - fee_cents)::int8, count(*)
         from (select *, (paid_at at time zone $3)::date as day from transactions) as t
         where status = 'PAID' and day between $1 and $2 and id <= $4
         group by merchant_id, day",
    );
    let query = query.bind(from).bind(to).bind(zone.name()).bind(input);
    fetch_settled(pool, query).await
}

/// Has the database note each time a job's `processed` goes down within an attempt (read back
/// by [`progress_gone_back`]): every committed value is seen, not samples of them.
pub async fn watch_progress(pool: &PgPool) {
    sqlx::raw_sql(
        "create table progress_gone_back (job_id bigint, was bigint, now bigint);
         create function note_progress_gone_back() returns trigger language plpgsql as $$
         begin
             if new.processed < old.processed and new.attempt = old.attempt then
                 insert into progress_gone_back values (new.id, old.processed, new.processed);
             end if;
             return null;
         end $$;
         create trigger progress_gone_back after update of processed on jobs
             for each row execute function note_progress_gone_back();",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// `(job, processed before, after)` of each step back [`watch_progress`] saw.
pub async fn progress_gone_back(pool: &PgPool) -> Vec<(i64, i64, i64)> {
    sqlx::query_as("select job_id, was, now from progress_gone_back")
        .fetch_all(pool)
        .await
        .unwrap()
}
