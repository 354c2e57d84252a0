//! Reads of the job's input, the `transactions` table: its planner statistics, the writers a
//! new job waits for, its high-water id, and the window of it a job reads (the id span and
//! count of the transactions paid within the job's days). The job's own run and parts are
//! in [`super::plan`].

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::{DateRange, Zone};

/// `(rows changed since the last analyze, rows estimated)` of `transactions`; the estimate is
/// negative when the table was never analyzed.
pub async fn transaction_statistics_age(
    conn: &mut PgConnection,
) -> Result<(i64, f64), sqlx::Error> {
    let row = sqlx::query!(
        r#"select coalesce(s.n_mod_since_analyze, 0) as "changed!", c.reltuples::float8 as "estimated!"
           from pg_class c left join pg_stat_user_tables s on s.relid = c.oid
           where c.oid = 'transactions'::regclass"#,
    )
    .fetch_one(conn)
    .await?;
    Ok((row.changed, row.estimated))
}

pub async fn analyze_transactions(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query!("analyze transactions").execute(conn).await?;
    Ok(())
}

pub async fn statistics_exist(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select exists (select 1 from pg_statistic_ext where stxname = $1) as "exists!""#,
        name
    )
    .fetch_one(conn)
    .await
}

/// `(merchant_id, day)` ndistinct statistics for `zone` (UTC's come with the migration).
pub async fn create_statistics(conn: &mut PgConnection, zone: Zone) -> Result<(), sqlx::Error> {
    // Dynamic: the statistics' name and day expression hold the zone, a literal (see `day_sql`).
    sqlx::query(AssertSqlSafe(format!(
        "create statistics if not exists {} (ndistinct) on merchant_id, ({}) from transactions",
        zone.statistics_name(),
        zone.day_sql()
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// The virtual transaction ids of the other sessions holding a lock on `transactions` that
/// allows writing (an insert takes ROW EXCLUSIVE before it draws an id).
pub async fn transaction_writers(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select distinct virtualtransaction as "virtualtransaction!" from pg_locks
           where relation = 'transactions'::regclass and granted and pid <> pg_backend_pid()
             and mode in ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                          'AccessExclusiveLock')"#,
    )
    .fetch_all(conn)
    .await
}

/// True while any of the virtual transactions `vxids` is still running (each holds the lock on
/// its own virtual xid until it ends).
pub async fn any_running(conn: &mut PgConnection, vxids: &[String]) -> Result<bool, sqlx::Error> {
    if vxids.is_empty() {
        return Ok(false);
    }
    sqlx::query_scalar!(
        r#"select exists (select 1 from pg_locks
                          where locktype = 'virtualxid' and virtualxid = any($1)) as "running!""#,
        vxids,
    )
    .fetch_one(conn)
    .await
}

/// The highest committed transaction id (0 when there are none) and a new snapshot, read one
/// job at a time: the lock orders the snapshots as the ids were read. The snapshot is also
/// above the id: a worker of the release before migration 0018, still running during a rolling
/// upgrade, records its high-water id as its snapshot, and a job fixed after it must be newer.
pub async fn fix_mark(conn: &mut PgConnection) -> Result<super::plan::Mark, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query!("select pg_advisory_xact_lock(hashtextextended('settle:snapshots', 0))")
        .execute(&mut *tx)
        .await?;
    // A statement of its own: its snapshot is taken once the lock is held.
    let mark = sqlx::query_as!(
        super::plan::Mark,
        r#"select hi as "high_water_id!",
                  setval('settlement_snapshots',
                         greatest(nextval('settlement_snapshots'), hi + 1)) as "snapshot_id!",
                  (select coalesce(max(id), 0) from transaction_revisions) as "revision_id!",
                  pg_current_snapshot()::text as "revision_snapshot!"
           from (select coalesce(max(id), 0) as hi from transactions) as mark"#
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(mark)
}

/// Whether a statement changed or removed stored rows up to `high_water_id` after the
/// revision `revision_id` (every revision where that is `None`): for a run fixed before
/// revisions were kept by row (migration 0021), which cannot be corrected by them.
pub async fn revised_since(
    conn: &mut PgConnection,
    revision_id: Option<i64>,
    high_water_id: i64,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select exists (select from transaction_revisions
                          where id > $1 and low_id <= $2) as "revised!""#,
        revision_id.unwrap_or(0),
        high_water_id,
    )
    .fetch_one(conn)
    .await
}

/// Whether `transactions` was truncated by a transaction `snapshot` (`pg_snapshot` as text)
/// does not see. First takes the table's ACCESS SHARE lock, which `conn`'s transaction then
/// holds to its end: a TRUNCATE (ACCESS EXCLUSIVE) committing after this check and before the
/// statements that follow it would leave no trace they could see (it writes no row revisions),
/// so it waits for the transaction instead.
pub async fn truncated_since(conn: &mut PgConnection, snapshot: &str) -> Result<bool, sqlx::Error> {
    sqlx::query!("lock table transactions in access share mode")
        .execute(&mut *conn)
        .await?;
    sqlx::query_scalar!(
        r#"select exists (select from transaction_revisions
                          where xid >= pg_snapshot_xmin($1::text::pg_snapshot)
                            and not pg_visible_in_snapshot(xid, $1::text::pg_snapshot)
                            and txn_id is null) as "truncated!""#,
        snapshot,
    )
    .fetch_one(conn)
    .await
}

/// The transactions up to a high-water id whose `paid_at` falls within a range's days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Just below the lowest such id (the high-water id when there are none).
    pub after_id: i64,
    /// The highest such id (the high-water id when there are none).
    pub last_id: i64,
    /// At most how many there are: exactly how many where [`window`] counted them, a bound
    /// from the quarter hours where [`bucket_span`] found the span; `None` when [`edges`]
    /// found it without either (the job counts them in its one pass over the rows).
    pub bound: Option<i64>,
    /// The first and the last of those ids in each quarter hour of the range that holds any,
    /// where [`bucket_span`] found the span (empty otherwise): where the input lies within the
    /// span, for cutting it into parts by their shares of the input.
    pub quarters: Vec<(i64, i64)>,
}

impl Window {
    /// The job's `total` before it has read its input: the exact count or the quarter hours'
    /// bound where there is one, else the ids in the span, which bound it too (and equal it
    /// where ids are dense).
    pub fn total_bound(&self) -> i64 {
        let span = self.last_id - self.after_id;
        self.bound.map_or(span, |bound| bound.min(span))
    }
}

/// How many ids at each end of the table [`edges`] looks at.
const EDGE_ROWS: i64 = 1_000;

/// The input's id span without a pass over it, when the range holds one of the lowest
/// `EDGE_ROWS` ids up to the high-water id and one of the highest (a range covering the
/// history's start and end, such as a month settled on a month of history): walking the primary
/// key from each end, the first row paid within the days is then the span's edge. `None` when
/// either end has no such row; [`bucket_span`] (or [`window`]) then finds the span through an
/// index on `paid_at`, at a cost that follows the range. This is what lets a job over (nearly)
/// all of the table read its rows once, counting them as it goes, instead of twice.
pub async fn edges(
    conn: &mut PgConnection,
    high_water_id: i64,
    range: DateRange,
    zone: Zone,
) -> Result<Option<Window>, sqlx::Error> {
    let within = paid_within(zone, "$2", "$3");
    // Dynamic: the time bound holds the job's zone as a literal (see `paid_within`).
    let (first, last): (Option<i64>, Option<i64>) = sqlx::query_as(AssertSqlSafe(format!(
        "select (select min(id) from (select id, paid_at from transactions where id <= $1
                                      order by id limit $4) as lowest where {within}),
                (select max(id) from (select id, paid_at from transactions where id <= $1
                                      order by id desc limit $4) as highest where {within})"
    )))
    .bind(high_water_id)
    .bind(range.from())
    .bind(range.to())
    .bind(EDGE_ROWS)
    .fetch_one(conn)
    .await?;
    Ok(first.zip(last).map(|(first, last)| Window {
        after_id: first - 1,
        last_id: last,
        bound: None,
        quarters: Vec::new(),
    }))
}

/// The quarter hour `instant` (SQL) falls in, as `transactions_paid_bucket_id_idx` (migration
/// 0014) indexes `paid_at`: a query must repeat the expression exactly for the planner to use it.
fn quarter_of(instant: &str) -> String {
    format!("date_bin('15 minutes', {instant}, timestamptz '2000-01-01 00:00:00+00')")
}

/// Common table expressions `days` (the range's first instant, the instant after it, and
/// whether both are on a quarter hour) and `quarters` (each quarter hour of the range's days,
/// none unless `days.aligned`), on `$from`/`$to` date parameters.
fn quarters_of_days(zone: Zone, from: &str, to: &str) -> String {
    let (starts, ends) = day_bounds(zone, from, to);
    format!(
        "days as (
             select starts, ends, {} = starts and {} = ends as aligned
             from (select {starts} as starts, {ends} as ends) as bounds
         ), quarters as (
             select at from days,
                 generate_series(days.starts, days.ends - interval '15 minutes',
                                 interval '15 minutes') as at
             where days.aligned
         )",
        quarter_of("starts"),
        quarter_of("ends"),
    )
}

/// The input's id span without a pass over its rows, from the quarter-hour index: the lowest
/// and the highest id up to the high-water id in each quarter hour of the range's days, two
/// index probes each (measured at 100M rows: a day's 96 quarter hours in a few milliseconds,
/// where [`window`]'s pass over its 3.3M `(paid_at, id)` entries took 0.5-1 s). Each quarter
/// hour's two ids are kept as the window's `quarters`. `None` when the zone's midnights at the
/// range's ends are not on a quarter hour (historical local mean times): [`window`] then finds
/// the span.
///
/// The job counts its rows as it reads them; until then its total is a bound from the same
/// ids: the ids from the lowest first to the first of the quarter hour that begins last (the
/// range's last, as ids follow time) bound the rows among them, and the rows above it, which
/// were posted later or in that last quarter hour (few, as ids follow time), are counted
/// through the index from just there. A row posted days late then adds one to the bound,
/// where the span counts every id it stretches over, also when it was paid in that last
/// quarter hour (whose last id is then the late row's).
pub async fn bucket_span(
    conn: &mut PgConnection,
    high_water_id: i64,
    range: DateRange,
    zone: Zone,
) -> Result<Option<Window>, sqlx::Error> {
    let quarter = quarter_of("paid_at");
    let probe = |order: &str| {
        format!(
            "(select id from transactions where {quarter} = quarters.at and id <= $1
              order by id {order} limit 1)"
        )
    };
    // Dynamic: the days' bounds hold the job's zone as a literal (see `day_bounds`).
    let (aligned, firsts, lasts, ends, above): (bool, Vec<i64>, Vec<i64>, Option<i64>, i64) =
        sqlx::query_as(AssertSqlSafe(format!(
            "with {}, spans as materialized (
                 select at, {} as first, {} as last from quarters
             ), ends as (
                 select first as id from spans where first is not null order by first desc limit 1
             )
             select (select aligned from days),
                    coalesce(array_agg(first) filter (where first is not null), '{{}}'),
                    coalesce(array_agg(last) filter (where first is not null), '{{}}'),
                    (select id from ends),
                    coalesce(sum((select count(*) from transactions
                                  where {quarter} = spans.at and id > ends.id and id <= $1))
                             filter (where last > ends.id), 0)::int8
             from spans left join ends on true",
            quarters_of_days(zone, "$2", "$3"),
            probe("asc"),
            probe("desc"),
        )))
        .bind(high_water_id)
        .bind(range.from())
        .bind(range.to())
        .fetch_one(conn)
        .await?;
    let first = firsts.iter().min().copied();
    let last = lasts.iter().max().copied();
    Ok(aligned.then(|| match first.zip(last) {
        Some((first, last)) => Window {
            after_id: first - 1,
            last_id: last,
            bound: ends.map(|ends| ends - first + 1 + above),
            quarters: firsts.into_iter().zip(lasts).collect(),
        },
        None => Window {
            after_id: high_water_id,
            last_id: high_water_id,
            bound: Some(0),
            quarters: Vec::new(),
        },
    }))
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
    // Dynamic: the time bound holds the job's zone as a literal (see `paid_within`).
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

/// Ranges of at most this many days have their batches probed ([`probe_batch`]): a probe makes
/// two passes of one index descent per quarter hour of the range. Measured on 10M rows, a
/// 30-day pass (2,880 descents) took 9-13 ms and a day's (96) about 0.4 ms, so a week's probe
/// is some 5 ms, about 1% of a 1M-id batch (~400 ms); longer ranges would pay more per batch
/// than they can save once per hole in their span.
pub const PROBED_DAYS: i64 = 7;

/// Where the input lies in the next batch of a part whose cursor is at `after` (its ids up to
/// `hi`, `batch` ids a batch), from the quarter-hour index: the first input id after `after`,
/// and the last one within `batch` ids of that first, each the lowest (highest) of its quarter
/// hour's, one index probe per quarter hour of the range's days ([`bucket_span`]'s probes,
/// bounded). Run it before the aggregation's tuning, which turns index scans off.
pub async fn probe_batch(
    conn: &mut PgConnection,
    (after, hi, batch): (i64, i64, i64),
    range: DateRange,
    zone: Zone,
) -> Result<Probe, sqlx::Error> {
    let quarter = quarter_of("paid_at");
    // Dynamic: the days' bounds hold the job's zone as a literal (see `day_bounds`).
    let (aligned, first, last): (bool, Option<i64>, Option<i64>) =
        sqlx::query_as(AssertSqlSafe(format!(
            "with {}, first as (
                 select min(probe.id) as id from quarters cross join lateral
                     (select id from transactions where {quarter} = quarters.at
                          and id > $1 and id <= $2
                      order by id limit 1) as probe
             )
             select (select aligned from days), first.id,
                    (select max(probe.id) from quarters cross join lateral
                         (select id from transactions where {quarter} = quarters.at
                              and id >= first.id and id <= least(first.id - 1 + $3, $2)
                          order by id desc limit 1) as probe)
             from first",
            quarters_of_days(zone, "$4", "$5"),
        )))
        .bind(after)
        .bind(hi)
        .bind(batch)
        .bind(range.from())
        .bind(range.to())
        .fetch_one(conn)
        .await?;
    Ok(match (aligned, first.zip(last)) {
        (false, _) => Probe::Unknown,
        (true, None) => Probe::Empty,
        (true, Some((first, last))) => Probe::Found { first, last },
    })
}

/// What [`probe_batch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The zone's midnights are off the quarter hours: the index cannot tell.
    Unknown,
    /// No row of the input in the part's remaining ids.
    Empty,
    /// The input's first id after the cursor, and its last within a batch of that.
    Found { first: i64, last: i64 },
}

/// The first instant of the day `from` and the last midnight of the day after `to` in the
/// zone, as SQL on `$from`/`$to` date parameters: the ends of a job's input in time. The zone
/// is a literal (see [`Zone::day_sql`]).
///
/// The end is the later midnight where the clocks bring midnight twice, which is how Postgres
/// reads it: where they go back across midnight (America/St_Johns until 2011, from 00:01 to
/// 23:01) `to`'s last hour comes again after the next day's first midnight, and a bound there
/// would leave it to no job. Where that later midnight is not the next day's first instant
/// (Havana, Azores: from 01:00 back to 00:00), the bound reaches into the next day, whose rows
/// the sums' day test (`kept`) leaves out: the bound only has to hold every row of the days.
fn day_bounds(zone: Zone, from: &str, to: &str) -> (String, String) {
    let name = zone.name().replace('\'', "''");
    (
        first_instant(&name, &format!("{from}::date")),
        format!("(({to}::date + 1)::timestamp at time zone '{name}')"),
    )
}

/// The first instant of the day `date` (SQL) in the zone `name`, as SQL. Postgres reads a
/// local time that happens twice as the later one, so where the clocks go back from 01:00 to
/// 00:00 (America/Havana each November, Atlantic/Azores each October) `date`'s midnight is
/// the second and the day's first hour would fall outside its job: the day begins instead at
/// the midnight read with the offset in force 25 hours before (more than any clock change: the
/// Alaska zones went back a whole day in 1867), when that instant is earlier and still on
/// `date`. Checked against a minute-by-minute search over every zone Postgres knows, 2005-2030
/// (with a look-back of three hours), and against that look-back for every day 1850-2040: the
/// two differ only on 1867-10-19 in Alaska, where three hours missed the day's first
/// occurrence.
///
/// Only immutable functions of the parameters, so the planner folds it to a constant as it did
/// the plain midnight: the arithmetic is on UTC wall times, since `timestamptz - interval` is
/// only stable and left a filter computing the bound for every row (a 5M-row count in psql:
/// 1.5 s against 0.29 s folded).
fn first_instant(name: &str, date: &str) -> String {
    let midnight = format!("({date}::timestamp at time zone '{name}')");
    let before = format!("(({midnight} at time zone 'UTC') - interval '25 hours')");
    let offset = format!("((({before} at time zone 'UTC') at time zone '{name}') - {before})");
    let earlier = format!("(({date}::timestamp - {offset}) at time zone 'UTC')");
    format!(
        "(case when {earlier} < {midnight} and ({earlier} at time zone '{name}')::date = {date} \
         then {earlier} else {midnight} end)"
    )
}

/// `paid_at >= <first instant of from> and paid_at < <first instant of the day after to>`, in
/// the zone (`day_bounds`): the time bound of a job's input, which the `(paid_at, id)` index
/// serves.
pub fn paid_within(zone: Zone, from: &str, to: &str) -> String {
    let (starts, ends) = day_bounds(zone, from, to);
    format!("paid_at >= {starts} and paid_at < {ends}")
}

/// The same time bound as [`paid_within`], written as `tstzrange(…) @> paid_at` for a part
/// batch, whose rows the primary key's id range finds: no btree serves `@>`, so the planner
/// cannot pick the `(paid_at, id)` index for the batch. It did for a short range's batches,
/// misled by its row estimate, and then read the whole range's index entries for every batch
/// to keep the batch's ids (measured on 100M rows, a one-day job's batch of 109,277 rows: 163-170
/// ms through that index, 40-47 ms through the primary key; of 1M rows, 445-608 ms against
/// 385-400 ms; a 30-day batch, which used the primary key already, 398-410 ms either way).
pub fn paid_within_filter(zone: Zone, from: &str, to: &str) -> String {
    let (starts, ends) = day_bounds(zone, from, to);
    format!("tstzrange({starts}, {ends}) @> paid_at")
}

/// The job's input window: one index-only pass over the range's days in the `(paid_at, id)`
/// index gives its id span and its exact size.
pub async fn window(
    conn: &mut PgConnection,
    high_water_id: i64,
    range: DateRange,
    zone: Zone,
) -> Result<Window, sqlx::Error> {
    // Dynamic: the time bound holds the job's zone as a literal (see `paid_within`).
    let (after_id, last_id, rows) = sqlx::query_as(AssertSqlSafe(format!(
        "select coalesce(min(id) - 1, $1), coalesce(max(id), $1), count(*)
         from transactions where id <= $1 and {}",
        paid_within(zone, "$2", "$3")
    )))
    .bind(high_water_id)
    .bind(range.from())
    .bind(range.to())
    .fetch_one(conn)
    .await?;
    Ok(Window {
        after_id,
        last_id,
        bound: Some(rows),
        quarters: Vec::new(),
    })
}
