//! The SQL of a settlement job's own state (its run, parts, batch sums and fence) and of its
//! output (`settlements`, the CSV's `COPY`): one small function per statement. Reads of its
//! input, `transactions` as a whole, are in [`super::input`]. Statements that group by the day
//! carry the zone as a literal (see [`Zone::day_sql`]), hence the formatted strings.

use chrono::NaiveDate;
use sqlx::{AssertSqlSafe, PgConnection};

use super::input::paid_within;
use super::{DateRange, Zone};

/// A job's fixed input, as stored in `settlement_runs`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Run {
    pub job_id: i64,
    pub from_date: NaiveDate,
    pub to_date: NaiveDate,
    pub time_zone: String,
    pub high_water_id: i64,
    pub total: i64,
}

/// One disjoint id sub-range `(lo_id, hi_id]` of a job and how far it has got.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Part {
    pub part: i32,
    pub lo_id: i64,
    pub hi_id: i64,
    /// Every id in `(lo_id, cursor_id]` is in the partial sums.
    pub cursor_id: i64,
    pub processed: i64,
}

impl Part {
    pub fn is_done(&self) -> bool {
        self.cursor_id >= self.hi_id
    }
}

/// Session settings of the aggregation, scoped to the caller's transaction: the hash aggregate
/// stays in memory, JIT (which costs more than it saves on these plans) stays off, every
/// execution is planned for its actual id bounds, and a batch's id range is read with a bitmap
/// heap scan, a page at a time, instead of an index scan that revisits each page per row
/// (measured: 80 ms against 110-135 ms per 100,000-row batch); index-only scans stay on.
/// Dates render as ISO in the CSV.
pub async fn set_local_tuning(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "select set_config('work_mem', '64MB', true), set_config('jit', 'off', true),
                set_config('plan_cache_mode', 'force_custom_plan', true),
                set_config('enable_indexscan', 'off', true),
                set_config('datestyle', 'ISO, YMD', true)",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The plan of a part batch, scoped to the caller's transaction.
///
/// - No parallel workers: a job's parts already run side by side, one per connection, and
///   each part's batches also starting parallel workers put three times as many processes on
///   the cores as there are parts (measured here, the batch aggregate over 10M rows in 3
///   concurrent parts on 2 cores: 5.6-7.2 s with 2 workers per part, 4.7-5.5 s without).
/// - A hash aggregate, never sort-and-group: the planner multiplies the selectivities of the
///   batch's id range and the job's `paid_at` bound as if independent (ids follow time), so on
///   a short range it expects a few thousand rows where there are 100,000 and sorts them
///   (measured: 153 ms sorted against 78 ms hashed for a 111,115-row batch of a one-day job).
///   A batch has at most one group per merchant-day, which `work_mem` holds.
pub async fn set_local_batch_plan(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "select set_config('max_parallel_workers_per_gather', '0', true),
                set_config('enable_sort', 'off', true)",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Lets the caller's transaction commit without waiting for its WAL flush (measured: 4.3 ms per
/// commit here, two commits per batch). Safe for a batch and its progress: a Postgres crash can
/// only lose the latest such commits whole (cursor and sums together), and any later
/// synchronous commit flushes them first; the job then redoes those batches. Not used for the
/// start or the finalize, whose commits a client may act on.
pub async fn set_local_async_commit(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("select set_config('synchronous_commit', 'off', true)")
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn get_run(conn: &mut PgConnection, job_id: i64) -> Result<Option<Run>, sqlx::Error> {
    sqlx::query_as(
        "select job_id, from_date, to_date, time_zone, high_water_id, total
         from settlement_runs where job_id = $1",
    )
    .bind(job_id)
    .fetch_optional(conn)
    .await
}

/// Stores the fixed input, owned by the claim `fence`.
pub async fn insert_run(conn: &mut PgConnection, run: &Run, fence: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into settlement_runs
             (job_id, from_date, to_date, time_zone, high_water_id, total, fence)
         values ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(run.job_id)
    .bind(run.from_date)
    .bind(run.to_date)
    .bind(&run.time_zone)
    .bind(run.high_water_id)
    .bind(run.total)
    .bind(fence)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn insert_part(
    conn: &mut PgConnection,
    job_id: i64,
    part: &Part,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into settlement_parts (job_id, part, lo_id, hi_id, cursor_id, processed)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(job_id)
    .bind(part.part)
    .bind(part.lo_id)
    .bind(part.hi_id)
    .bind(part.cursor_id)
    .bind(part.processed)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get_parts(conn: &mut PgConnection, job_id: i64) -> Result<Vec<Part>, sqlx::Error> {
    sqlx::query_as(
        "select part, lo_id, hi_id, cursor_id, processed from settlement_parts
         where job_id = $1 order by part",
    )
    .bind(job_id)
    .fetch_all(conn)
    .await
}

/// The first id of the job's input after `after` up to `hi`, to skip a gap: ids that do not
/// exist, or rows paid outside the job's days (later or earlier arrivals between its own).
pub async fn next_id(
    conn: &mut PgConnection,
    after: i64,
    hi: i64,
    range: DateRange,
    zone: Zone,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "select min(id) from transactions where id > $1 and id <= $2 and {}",
        paid_within(zone, "$3", "$4")
    )))
    .bind(after)
    .bind(hi)
    .bind(range.from())
    .bind(range.to())
    .fetch_one(conn)
    .await
}

/// Reads the job's input with ids in `(after, up_to]` (the transactions paid within `range`'s
/// days) and stores, as one row of the part's batch sums, the `(merchant, day)` sums of the
/// PAID ones. Returns the rows read, `None` when there were none (nothing is stored then). Grouping every row and
/// filtering inside the aggregates counts the rows read in the same pass. A batch sum past 64
/// bits fails its cast (SQLSTATE 22003).
pub async fn aggregate_ids(
    conn: &mut PgConnection,
    job_id: i64,
    part: i32,
    (after, up_to): (i64, i64),
    range: DateRange,
    zone: Zone,
) -> Result<Option<i64>, sqlx::Error> {
    let day = zone.day_sql();
    let paid = "status = 'PAID'";
    let within = paid_within(zone, "$5", "$6");
    sqlx::query_scalar(AssertSqlSafe(format!(
        "insert into settlement_batches (job_id, part, end_id, scanned,
             merchant_ids, dates, gross_cents, fee_cents, txn_counts)
         select $1, $2, $4, sum(scanned)::int8,
                coalesce(array_agg(merchant_id) filter (where kept), '{{}}'),
                coalesce(array_agg(day) filter (where kept), '{{}}'),
                coalesce(array_agg(gross) filter (where kept), '{{}}'),
                coalesce(array_agg(fee) filter (where kept), '{{}}'),
                coalesce(array_agg(n) filter (where kept), '{{}}')
         from (
             select merchant_id, {day} as day,
                    coalesce(sum(amount_cents) filter (where {paid}), 0)::int8 as gross,
                    coalesce(sum(fee_cents) filter (where {paid}), 0)::int8 as fee,
                    count(*) filter (where {paid}) as n,
                    count(*) as scanned,
                    {day} between $5 and $6 and count(*) filter (where {paid}) > 0 as kept
             from transactions
             where id > $3 and id <= $4 and {within}
             group by merchant_id, {day}
         ) as groups
         having count(*) > 0
         returning scanned"
    )))
    .bind(job_id)
    .bind(part)
    .bind(after)
    .bind(up_to)
    .bind(range.from())
    .bind(range.to())
    .fetch_optional(conn)
    .await
}

/// Folds all of a part's batch rows into one, so finishing the job merges one row per part
/// (the parts fold concurrently, at their ends, instead of the job folding every batch at
/// once). A sum past 64 bits fails its cast (SQLSTATE 22003).
pub async fn fold_part(conn: &mut PgConnection, job_id: i64, part: i32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "with old as (
             delete from settlement_batches where job_id = $1 and part = $2
             returning end_id, scanned, merchant_ids, dates, gross_cents, fee_cents, txn_counts
         ), merged as (
             select m, d, sum(g)::int8 as g, sum(f)::int8 as f, sum(n)::int8 as n
             from old, unnest(old.merchant_ids, old.dates, old.gross_cents, old.fee_cents,
                              old.txn_counts) as u(m, d, g, f, n)
             group by m, d
         )
         insert into settlement_batches (job_id, part, end_id, scanned,
             merchant_ids, dates, gross_cents, fee_cents, txn_counts)
         select $1, $2, (select max(end_id) from old), (select sum(scanned) from old)::int8,
                coalesce(array_agg(m), '{}'), coalesce(array_agg(d), '{}'),
                coalesce(array_agg(g), '{}'), coalesce(array_agg(f), '{}'),
                coalesce(array_agg(n), '{}')
         from merged
         having (select count(*) from old) > 0",
    )
    .bind(job_id)
    .bind(part)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn advance_part(
    conn: &mut PgConnection,
    job_id: i64,
    part: i32,
    cursor_id: i64,
    rows: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update settlement_parts set cursor_id = $3, processed = processed + $4
         where job_id = $1 and part = $2",
    )
    .bind(job_id)
    .bind(part)
    .bind(cursor_id)
    .bind(rows)
    .execute(conn)
    .await?;
    Ok(())
}

/// Serializes replacements of `settlements`, so overlapping jobs finishing at once cannot
/// interleave their deletes and inserts. Released at commit.
pub async fn lock_settlements(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('settle:settlements', 0))")
        .execute(conn)
        .await?;
    Ok(())
}

/// Writes the job's sums into `settlements`, built from the input snapshot `snapshot_id` (the
/// job's high-water id). Newest input wins: a `(merchant, day)` is inserted, or updated in place
/// (see migration 0007) only where the stored row was built from the same or an older snapshot;
/// the range's rows the job did not produce are deleted only where they are older (their
/// merchant-day has no PAID transactions in this newer input). A row a newer job wrote stays as
/// it is, whichever job finishes last. The casts to bigint fail (SQLSTATE 22003) rather than
/// wrap when a sum leaves the 64-bit range.
pub async fn replace_settlements(
    conn: &mut PgConnection,
    job_id: i64,
    snapshot_id: i64,
    range: DateRange,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into settlements
             (merchant_id, date, gross_cents, fee_cents, net_cents, txn_count, job_id,
              snapshot_id)
         select m, d, sum(g)::int8, sum(f)::int8, (sum(g) - sum(f))::int8, sum(n)::int8, $1, $2
         from settlement_batches as b,
              unnest(b.merchant_ids, b.dates, b.gross_cents, b.fee_cents, b.txn_counts)
                  as u(m, d, g, f, n)
         where b.job_id = $1
         group by m, d
         on conflict (merchant_id, date) do update set
             gross_cents = excluded.gross_cents, fee_cents = excluded.fee_cents,
             net_cents = excluded.net_cents, txn_count = excluded.txn_count,
             job_id = excluded.job_id, generated_at = excluded.generated_at,
             snapshot_id = excluded.snapshot_id
         where settlements.snapshot_id <= excluded.snapshot_id",
    )
    .bind(job_id)
    .bind(snapshot_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "delete from settlements
         where date between $3 and $4 and job_id <> $1 and snapshot_id < $2",
    )
    .bind(job_id)
    .bind(snapshot_id)
    .bind(range.from())
    .bind(range.to())
    .execute(conn)
    .await?;
    Ok(())
}

/// Reclaims what a finished job left dead: its batch sums (all deleted, about 1 MB of arrays
/// per batch) and the settlement versions it replaced. Autovacuum does this too where it is on;
/// where it is off (as on the machine the benchmarks ran on) the scratch table's TOAST would
/// otherwise grow by every job's arrays, and each re-run of a range would walk more dead index
/// entries. Run after the job's COMPLETED commit, outside it (VACUUM cannot run in a
/// transaction); skips a table another vacuum holds instead of waiting.
pub async fn vacuum_after_replace(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("vacuum (skip_locked) settlement_batches, settlements")
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes the job's batch sums, parts and fixed input.
pub async fn delete_working_rows(conn: &mut PgConnection, job_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "with batches as (delete from settlement_batches where job_id = $1),
              parts as (delete from settlement_parts where job_id = $1)
         delete from settlement_runs where job_id = $1",
    )
    .bind(job_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the working rows of settlement jobs that are no longer live (FAILED after their last
/// attempt, or pruned): only a cancel or a fatal error cleans up after itself, so a job that
/// ran out of attempts would otherwise leave its partial sums behind forever.
/// The runs are read before the queue is asked which of their jobs are live: a job never
/// becomes live again, and a run inserted meanwhile is not in the list.
pub async fn delete_abandoned_working_rows(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let mut abandoned: Vec<i64> = sqlx::query_scalar("select job_id from settlement_runs")
        .fetch_all(&mut *conn)
        .await?;
    let live = settle_workers::read::live_jobs(conn, &abandoned).await?;
    abandoned.retain(|job_id| !live.contains(job_id));
    for &job_id in &abandoned {
        delete_working_rows(conn, job_id).await?;
    }
    Ok(abandoned.len() as u64)
}

/// Hands the run to the claim `fence`: waits for part batches of an earlier owner in flight.
pub async fn set_run_fence(
    conn: &mut PgConnection,
    job_id: i64,
    fence: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("update settlement_runs set fence = $2 where job_id = $1")
        .bind(job_id)
        .bind(fence)
        .execute(conn)
        .await?;
    Ok(())
}

/// True while `fence` owns the run; the share lock holds off a new owner until this
/// transaction ends, so a former owner's part batch can never commit after the new one began.
pub async fn lock_run(
    conn: &mut PgConnection,
    job_id: i64,
    fence: i64,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query_scalar::<_, i32>(
        "select 1 from settlement_runs where job_id = $1 and fence = $2 for share",
    )
    .bind(job_id)
    .bind(fence)
    .fetch_optional(conn)
    .await?
    .is_some())
}
