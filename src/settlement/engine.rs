//! The steps of a settlement job, independent of the queue that runs them: each takes the
//! connection or transaction the caller gives it, so the caller decides what commits together
//! (a batch's partial sums with the job's checkpoint, the replacement with the completion).

use sqlx::{PgConnection, PgPool};

use super::input;
use super::results;
use super::store::{self, Part, Run};
use super::{DateRange, Settings, SettleError, Zone};

/// Rows changed since the last `ANALYZE` beyond which the statistics count as stale: the
/// planner then misjudges the keyset scans (measured: 582 ms per batch on fresh, unanalyzed
/// rows against 0.7 ms after `ANALYZE`).
const STALE_FRACTION: f64 = 0.1;
const STALE_MIN_ROWS: f64 = 10_000.0;

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

/// The highest committed transaction id, returned once no row below it can still commit. An
/// insert in flight holds ids it drew from the sequence, possibly below ids another insert
/// already committed; committing after the job counted its total, it would land under the mark
/// uncounted. Any such insert was open when the mark was read, so it is among the transactions
/// holding a write lock on `transactions` just after: this waits until those have ended (as
/// `CREATE INDEX CONCURRENTLY` waits for lockers). Inserts that start later draw ids above the
/// mark. Nobody waits for the job: unlike a table lock, this never holds up an insert, even
/// behind a long bulk load.
pub async fn high_water_mark(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let hi = input::max_id(&mut conn).await?;
    let writers = input::transaction_writers(&mut conn).await?;
    while input::any_running(&mut conn, &writers).await? {
        tokio::time::sleep(INSERT_POLL).await;
    }
    Ok(hi)
}

/// Fixes the job's input the first time it runs and returns it; on any later run returns what
/// was fixed then, with each part's committed cursor. A first start must be given the
/// [`high_water_mark`]: the input is every transaction up to it whose `paid_at` falls within
/// the range's days, found through the `(paid_at, id)` index, which also gives the id span
/// those rows occupy and their exact count (the job's `total`: what it will read). The span is
/// cut into `parts` disjoint id sub-ranges. Either way the run now belongs to the claim `fence`
/// (see [`store::lock_run`]): part batches of an earlier owner stop landing.
pub async fn start(
    tx: &mut PgConnection,
    job_id: i64,
    range: DateRange,
    settings: &Settings,
    fence: i64,
    high_water: Option<i64>,
) -> Result<Plan, sqlx::Error> {
    if let Some(run) = store::get_run(tx, job_id).await? {
        store::set_run_fence(tx, job_id, fence).await?;
        let parts = store::get_parts(tx, job_id).await?;
        return Ok(Plan { run, parts });
    }
    let abandoned = store::delete_abandoned_working_rows(tx).await?;
    if abandoned > 0 {
        tracing::info!(
            abandoned,
            "deleted working rows of settlement jobs no longer running"
        );
    }
    let hi = high_water.expect("a first start is given engine::high_water_mark");
    refresh_statistics(tx, settings.zone).await?;
    store::set_local_tuning(tx).await?;
    let window = input::window(tx, hi, range, settings.zone).await?;
    let run = Run {
        job_id,
        from_date: range.from(),
        to_date: range.to(),
        time_zone: settings.zone.name().to_owned(),
        high_water_id: hi,
        total: window.rows,
    };
    store::insert_run(tx, &run, fence).await?;
    let parts = split(window.after_id, window.last_id, settings.parts);
    for part in &parts {
        store::insert_part(tx, job_id, part).await?;
    }
    Ok(Plan { run, parts })
}

/// `(lo, hi]` cut into `n` contiguous id ranges of equal width (the last takes the remainder).
fn split(lo: i64, hi: i64, n: u32) -> Vec<Part> {
    let n = i64::from(n.max(1));
    let width = (hi - lo).max(0) / n;
    (0..n)
        .map(|i| {
            let start = lo + width * i;
            let end = if i == n - 1 {
                hi.max(lo)
            } else {
                start + width
            };
            Part {
                part: i as i32,
                lo_id: start,
                hi_id: end,
                cursor_id: start,
                processed: 0,
            }
        })
        .collect()
}

/// Aggregates the next batch of `part` into one row of partial sums and advances its cursor,
/// in `tx`; the caller commits it with the checkpoint. A batch is the next `batch_size` ids
/// after the cursor (keyset on the primary key, never OFFSET), so it holds at most
/// `batch_size` rows and exactly that many where ids are dense; an empty batch jumps the gap to
/// the next id. The part's last batch also folds the part's rows into one. Returns the part as
/// it stands after the batch.
pub async fn process_batch(
    tx: &mut PgConnection,
    plan: &Plan,
    part: &Part,
    batch_size: i64,
) -> Result<Part, SettleError> {
    store::set_local_tuning(tx).await?;
    store::set_local_batch_plan(tx).await?;
    let job_id = plan.run.job_id;
    let mut next = part.clone();
    let end = part
        .cursor_id
        .saturating_add(batch_size.max(1))
        .min(part.hi_id);
    let ids = (part.cursor_id, end);
    match store::aggregate_ids(tx, job_id, part.part, ids, plan.range(), plan.zone())
        .await
        .map_err(overflow)?
    {
        Some(scanned) => {
            next.cursor_id = end;
            next.processed += scanned;
        }
        None => {
            let following = store::next_id(tx, end, part.hi_id, plan.range(), plan.zone()).await?;
            next.cursor_id = following.map_or(part.hi_id, |id| id - 1).max(end);
        }
    }
    if next.is_done() {
        store::fold_part(tx, job_id, part.part)
            .await
            .map_err(overflow)?;
    }
    store::advance_part(
        tx,
        job_id,
        part.part,
        next.cursor_id,
        next.processed - part.processed,
    )
    .await?;
    Ok(next)
}

/// Writes the job's sums into `settlements` where no newer input's rows stand (see
/// [`store::replace_settlements`]), stores the range's rows as the job's result (its CSV), and
/// deletes the job's working rows, all in `tx`: the caller commits them with the job's
/// completion, so the table, the result and COMPLETED land together or not at all. Returns the
/// result's row count.
pub async fn finalize(tx: &mut PgConnection, plan: &Plan) -> Result<u64, SettleError> {
    store::set_local_tuning(tx).await?;
    store::lock_settlements(tx).await?;
    store::replace_settlements(tx, plan.run.job_id, plan.run.high_water_id, plan.range())
        .await
        .map_err(overflow)?;
    let rows = results::store(tx, plan.run.job_id, plan.range()).await?;
    store::delete_working_rows(tx, plan.run.job_id).await?;
    Ok(rows)
}

/// A sum cast to bigint that does not fit (SQLSTATE 22003) is the job's overflow error.
fn overflow(e: sqlx::Error) -> SettleError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("22003") => SettleError::Overflow,
        _ => SettleError::Sql(e),
    }
}

/// Forgets a cancelled or failed job's working rows. `settlements` and the results are
/// untouched: only a committed [`finalize`] ever writes them.
pub async fn discard(conn: &mut PgConnection, job_id: i64) -> Result<(), SettleError> {
    store::delete_working_rows(conn, job_id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn parts_cover_the_range_without_overlap() {
        for (lo, hi, n) in [(0, 10, 3), (5, 5, 2), (0, 1, 4), (100, 1_000_000, 2)] {
            let parts = split(lo, hi, n);
            assert_eq!(parts.len(), n as usize);
            assert_eq!(parts[0].lo_id, lo);
            assert_eq!(parts.last().unwrap().hi_id, hi);
            for pair in parts.windows(2) {
                assert_eq!(pair[0].hi_id, pair[1].lo_id);
            }
            assert!(parts.iter().all(|p| p.lo_id <= p.hi_id));
        }
    }
}
