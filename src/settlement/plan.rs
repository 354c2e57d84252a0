//! Step 1 of a settlement job: fix its input. The first time a job runs it takes the
//! [`high_water_mark`] and, of the transactions up to it, finds those paid within the job's
//! days (their id span, and their count or a bound on it, through [`super::input`]), and cuts
//! the span into parts; a resumed job reads back what was fixed then. The result is a
//! [`Plan`], which the parts ([`super::parts`]) and the finalize ([`super::finalize`]) work
//! from.

use chrono::NaiveDate;
use sqlx::{PgConnection, PgPool};

use super::input;
use super::{DateRange, Settings, Zone};

/// A job's fixed input, as stored in `settlement_runs`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Run {
    pub job_id: i64,
    pub from_date: NaiveDate,
    pub to_date: NaiveDate,
    pub time_zone: String,
    pub high_water_id: i64,
    /// The input's snapshot: its place in the order jobs fixed their inputs (see [`Mark`]).
    pub snapshot_id: i64,
    /// The newest revision of stored rows the input holds (see [`Mark`]); `None` for a run fixed
    /// before revisions were kept, which every revision since is newer than.
    pub revision_id: Option<i64>,
    /// The snapshot the input was fixed in (see [`Mark`]); `None` for a run fixed before
    /// revisions were kept by row (migration 0021).
    pub revision_snapshot: Option<String>,
    /// The input's exact count, or a bound on it (the ids of its span) where the job counts
    /// its rows as it reads them ([`input::edges`]); the completion records the count.
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

/// A job's fixed input and its parts, as of its last commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub run: Run,
    pub parts: Vec<Part>,
}

impl Plan {
    pub fn range(&self) -> DateRange {
        // Stored by `start` from a parsed range, and checked by `settlement_run_range_ordered`.
        DateRange::new(self.run.from_date, self.run.to_date, i64::MAX)
            .expect("a stored run has an ordered range")
    }

    /// The zone the job started with: a resumed job keeps it even if the config changed.
    pub fn zone(&self) -> Zone {
        Zone::parse(&self.run.time_zone).unwrap_or(Zone(chrono_tz::Tz::UTC))
    }

    pub fn processed(&self) -> i64 {
        self.parts.iter().map(|p| p.processed).sum()
    }
}

/// Rows changed since the last `ANALYZE` beyond which the statistics count as stale: the
/// planner then misjudges the keyset scans (measured: 582 ms per batch on fresh, unanalyzed
/// rows against 0.7 ms after `ANALYZE`).
const STALE_FRACTION: f64 = 0.1;

const STALE_MIN_ROWS: f64 = 10_000.0;

/// Makes sure the planner knows `transactions` well: statistics for the zone's day expression
/// exist, and the table is analyzed if many rows changed since it last was (e.g. right after a
/// bulk load, before autovacuum got to it). Returns whether it analyzed.
pub async fn refresh_statistics(conn: &mut PgConnection, zone: Zone) -> Result<bool, sqlx::Error> {
    let created = if input::statistics_exist(conn, &zone.statistics_name()).await? {
        false
    } else {
        input::create_statistics(conn, zone).await?;
        true
    };
    let (modified, estimated) = input::transaction_statistics_age(conn).await?;
    let stale = estimated < 0.0 || modified as f64 > STALE_MIN_ROWS.max(estimated * STALE_FRACTION);
    if created || stale {
        input::analyze_transactions(conn).await?;
    }
    Ok(created || stale)
}

/// How often [`high_water_mark`] looks whether the inserts it waits for have ended.
const INSERT_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// A job's input as [`high_water_mark`] fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The input is every transaction up to this id.
    pub high_water_id: i64,
    /// Its place in the order jobs fixed their inputs, which is what "newest" means when
    /// overlapping jobs replace each other's rows ([`super::finalize`]): a job fixed later
    /// reads the data as it is later, fixed rows (refunds, deletions) included, which a
    /// high-water id alone does not show.
    pub snapshot_id: i64,
    /// The newest `transaction_revisions` row then: the revisions no live run can still need
    /// are at or below it ([`super::finalize::prune_revisions`]).
    pub revision_id: i64,
    /// The snapshot it was read in (`pg_snapshot` as text): a change this does not see was
    /// committed later, and may have been read by some batches and not others
    /// ([`super::finalize`]).
    pub revision_snapshot: String,
}

/// The highest committed transaction id, returned once no row below it can still commit. An
/// insert in flight holds ids it drew from the sequence, possibly below ids another insert
/// already committed; committing after the job counted its total, it would land under the mark
/// uncounted. Any such insert was open when the mark was read, so it is among the transactions
/// holding a write lock on `transactions` just after: this waits until those have ended (as
/// `CREATE INDEX CONCURRENTLY` waits for lockers). Inserts that start later draw ids above the
/// mark. Nobody waits for the job: unlike a table lock, this never holds up an insert, even
/// behind a long bulk load.
///
/// The snapshot is drawn with the id, under a lock, so while rows are only inserted a later
/// snapshot never has a lower high-water id. An update or delete of stored rows in flight is
/// among the writers waited for too: every batch reads its outcome, and one committed later
/// leaves revisions the mark's `revision_snapshot` does not see, by which the finalize
/// corrects the sums of the batches that read the rows before it.
pub async fn high_water_mark(pool: &PgPool) -> Result<Mark, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mark = input::fix_mark(&mut conn).await?;
    let writers = input::transaction_writers(&mut conn).await?;
    while input::any_running(&mut conn, &writers).await? {
        tokio::time::sleep(INSERT_POLL).await;
    }
    Ok(mark)
}

/// Fixes the job's input the first time it runs and returns it; on any later run returns what
/// was fixed then, with each part's committed cursor. A first start must be given the
/// [`high_water_mark`]: the input is every transaction up to it whose `paid_at` falls within
/// the range's days. Their id span comes from the primary key's two ends where the range holds
/// the first and the last of those transactions ([`input::edges`]: a month settled on a month of
/// history, read once and counted as it is read); else from the quarter-hour index, two probes
/// per quarter hour ([`input::bucket_span`]); else (a zone whose midnight is off the quarter
/// hours) from the `(paid_at, id)` index, which also gives their exact count. The job's `total`
/// is that count, the quarter hours' bound, or the span's ids, which bound it too. The span is
/// cut into disjoint id sub-ranges, the job's parts (`weights` below, [`super::cuts`]). Either way
/// the run now belongs to the claim `fence` (see [`super::parts::lock_run`]): part batches of
/// an earlier owner stop landing.
pub async fn start(
    tx: &mut PgConnection,
    job_id: i64,
    range: DateRange,
    settings: &Settings,
    fence: i64,
    high_water: Option<Mark>,
) -> Result<Plan, sqlx::Error> {
    if let Some(run) = get_run(tx, job_id).await? {
        set_run_fence(tx, job_id, fence).await?;
        let parts = get_parts(tx, job_id).await?;
        return Ok(Plan { run, parts });
    }
    let mark = high_water.expect("a first start is given plan::high_water_mark");
    let hi = mark.high_water_id;
    refresh_statistics(tx, settings.zone).await?;
    // The span's queries are index probes the planner costs high (a count per quarter hour it
    // cannot tell is empty): JIT compiled them for 30-50 ms of a 1-5 ms query (100M rows).
    super::set_local(tx, &[("jit", "off")]).await?;
    // Without the aggregation's tuning (each batch sets it), which turns off the index scans
    // the edges and the quarter hours probe and the index-only scan that counts a short range
    // (measured: a day of 10M rows in 128 ms index-only against 685 ms through the heap, where
    // the visibility map is set, as autovacuum leaves an insert-only table).
    let window = match input::edges(tx, hi, range, settings.zone).await? {
        Some(window) => window,
        None => match input::bucket_span(tx, hi, range, settings.zone).await? {
            Some(window) => window,
            None => input::window(tx, hi, range, settings.zone).await?,
        },
    };
    let run = Run {
        job_id,
        from_date: range.from(),
        to_date: range.to(),
        time_zone: settings.zone.name().to_owned(),
        high_water_id: hi,
        snapshot_id: mark.snapshot_id,
        revision_id: Some(mark.revision_id),
        revision_snapshot: Some(mark.revision_snapshot),
        total: window.total_bound(),
    };
    insert_run(tx, &run, fence).await?;
    let parts = split(&window, &weights(settings, run.total));
    for part in &parts {
        insert_part(tx, job_id, part).await?;
    }
    Ok(Plan { run, parts })
}

/// The shares of a runner's input in its parts, largest first (see [`weights`]).
const TIERS: [u32; 3] = [6, 2, 1];

/// The weights of the parts a job's input of at most `bound` rows is cut into. The job runs
/// `settings.parts` of them at once and each runner, its part done, takes the next
/// ([`super::job`]). Where a runner's share spans several batches, each share is cut into
/// [`TIERS`]: the large parts first, then ever smaller ones, so a runner that ran slower than
/// the others (a busy core) leaves them a small part to wait for at the end instead of the rest
/// of a third of the input, while the cores would stand half idle. Smaller shares are one part
/// each.
fn weights(settings: &Settings, bound: i64) -> Vec<u32> {
    let runners = settings.parts.max(1) as usize;
    if bound / runners as i64 <= settings.batch_size {
        return vec![1; runners];
    }
    TIERS
        .iter()
        .flat_map(|&weight| std::iter::repeat_n(weight, runners))
        .collect()
}

/// `window`'s span cut into parts of `weights` ([`super::cuts`]), each at its start.
fn split(window: &input::Window, weights: &[u32]) -> Vec<Part> {
    super::cuts::spans(window, weights)
        .into_iter()
        .enumerate()
        .map(|(i, (lo_id, hi_id))| Part {
            part: i as i32,
            lo_id,
            hi_id,
            cursor_id: lo_id,
            processed: 0,
        })
        .collect()
}

pub async fn get_run(conn: &mut PgConnection, job_id: i64) -> Result<Option<Run>, sqlx::Error> {
    sqlx::query_as!(
        Run,
        // A run the release before fixed names no snapshot: its high-water id was its snapshot.
        r#"select job_id, from_date, to_date, time_zone, high_water_id,
                  coalesce(snapshot_id, high_water_id) as "snapshot_id!", revision_id,
                  revision_snapshot::text as revision_snapshot, total
           from settlement_runs where job_id = $1"#,
        job_id,
    )
    .fetch_optional(conn)
    .await
}

/// Stores the fixed input, owned by the claim `fence`.
pub async fn insert_run(conn: &mut PgConnection, run: &Run, fence: i64) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "insert into settlement_runs
             (job_id, from_date, to_date, time_zone, high_water_id, snapshot_id, revision_id,
              total, fence, revision_snapshot)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::pg_snapshot)",
        run.job_id,
        run.from_date,
        run.to_date,
        run.time_zone,
        run.high_water_id,
        run.snapshot_id,
        run.revision_id,
        run.total,
        fence,
        run.revision_snapshot,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn insert_part(
    conn: &mut PgConnection,
    job_id: i64,
    part: &Part,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "insert into settlement_parts (job_id, part, lo_id, hi_id, cursor_id, processed)
         values ($1, $2, $3, $4, $5, $6)",
        job_id,
        part.part,
        part.lo_id,
        part.hi_id,
        part.cursor_id,
        part.processed,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get_parts(conn: &mut PgConnection, job_id: i64) -> Result<Vec<Part>, sqlx::Error> {
    sqlx::query_as!(
        Part,
        "select part, lo_id, hi_id, cursor_id, processed from settlement_parts
         where job_id = $1 order by part",
        job_id,
    )
    .fetch_all(conn)
    .await
}

/// Hands the run to the claim `fence`: waits for part batches of an earlier owner in flight.
pub async fn set_run_fence(
    conn: &mut PgConnection,
    job_id: i64,
    fence: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "update settlement_runs set fence = $2 where job_id = $1",
        job_id,
        fence
    )
    .execute(conn)
    .await?;
    Ok(())
}
