//! Step 3 of a settlement job: finalize. In the transaction that completes the job, the job's
//! sums replace the range's rows of `settlements` (never a row built from a newer input) and
//! become the job's result ([`super::results`]); its working rows go. A cancelled or failed job
//! forgets them instead ([`delete_working_rows`]), and jobs that ended without either are swept
//! by [`delete_abandoned_working_rows`].

use sqlx::PgConnection;

use super::plan::Plan;
use super::{DateRange, SettleError};
use super::{input, parts, results};

/// Writes the job's sums into `settlements` where no newer input's rows stand (see
/// [`replace_settlements`]), once the stored parts are as the run left them
/// ([`SettleError::Behind`] where a crash took their last batches) and corrected by the changes
/// of stored rows its batches did not see ([`sum_revisions`]; [`SettleError::Revised`] where
/// they cannot be, or where the job's days changed since its input beside a day a newer input
/// holds, see [`revised_beside_a_newer_input`]), stores the range's rows as the job's result
/// (its CSV), and deletes the job's working rows, all in `tx`: the caller commits them with
/// the job's completion, so the table, the result and COMPLETED land together or not at all.
/// Returns the result's row count.
///
/// The finalizes of overlapping jobs run one at a time, from before the correction to the
/// commit ([`lock_settlements`]): the state a job publishes (the table as its correction reads
/// it) is then newer than everything published before it, and the days those jobs took are
/// committed when it looks for them.
pub async fn finalize(tx: &mut PgConnection, plan: &Plan) -> Result<u64, SettleError> {
    // The parts as stored, or the sums lack what a crash took of their last batches.
    if super::plan::get_parts(tx, plan.run.job_id).await? != plan.parts {
        return Err(SettleError::Behind);
    }
    lock_settlements(tx).await?;
    sum_revisions(tx, plan).await?;
    if let Some(fixed_in) = &plan.run.revision_snapshot
        && revised_beside_a_newer_input(tx, plan, fixed_in).await?
    {
        return Err(SettleError::Revised);
    }
    super::set_local_tuning(tx).await?;
    replace_settlements(tx, plan.run.job_id, plan.run.snapshot_id, plan.range())
        .await
        .map_err(SettleError::from_sum)?;
    let rows = results::store(tx, plan.run.job_id, plan.range()).await?;
    delete_working_rows(tx, plan.run.job_id, None).await?;
    Ok(rows)
}

/// Makes the job's sums those of its input as this statement's snapshot holds it, in the
/// finalize's transaction. Each batch read its rows in a snapshot of its own, recorded with the
/// ids it read (`settlement_reads`, migration 0021); a row changed or removed while the job ran
/// left a revision with the row before and after and its transaction's id. For each revision
/// of a row up to the high-water id committed since the input was fixed (one the run's
/// `revision_snapshot` does not see):
///
/// - the row was read by a batch whose snapshot did not see the change: the sums take the new
///   row's share and give back the old one's (a PAID row in the range counts its merchant-day);
///   a row's changes chain, each one's old row the one before's new row, so together they move
///   it from what its batch read to what this snapshot holds;
/// - no batch read the row (its id held none of the input when it was passed over): it takes
///   its share as this snapshot holds it.
///
/// A batch read on a standby also recorded the changes it saw (migration 0022): a standby's
/// snapshot does not list the transactions in progress there, so it alone would take a change
/// still running on the primary as seen. A batch read on the primary recorded that it was
/// (migration 0024): its snapshot is exact whatever its shape (one of a batch whose own
/// transaction id is its xmin lists nothing in progress, as a standby's does).
///
/// The sums go into one part [`parts::REVISED_PART`] row, which [`replace_settlements`] adds to
/// the parts'. The work follows the revisions, not the rows they touched, so changes on every
/// day of a month's range cost what they are. [`SettleError::Revised`] (the job starts over)
/// for what this cannot correct: a TRUNCATE since the input was fixed, a run fixed before
/// revisions were kept by row (no `revision_snapshot`) whose input was revised, a part whose
/// reads do not account for every row it read (batches of a worker of the release before
/// 0021, during a rolling upgrade), or a change that a read of a worker of a release before
/// 0024 cannot tell whether it saw (its snapshot has a standby's shape, and it recorded
/// neither the changes it saw nor where it read).
pub async fn sum_revisions(tx: &mut PgConnection, plan: &Plan) -> Result<(), SettleError> {
    let run = &plan.run;
    let Some(fixed_in) = &run.revision_snapshot else {
        return match input::revised_since(tx, run.revision_id, run.high_water_id).await? {
            true => Err(SettleError::Revised),
            false => Ok(()),
        };
    };
    if input::truncated_since(tx, fixed_in).await? || !reads_account_for_parts(tx, plan).await? {
        return Err(SettleError::Revised);
    }
    match parts::sum_revisions(tx, plan, fixed_in).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(SettleError::Revised),
        Err(e) => Err(SettleError::from_sum(e)),
    }
}

/// Whether the job, finalizing beside a newer input, would publish a state of the table newer
/// than that input's: some day of its range is held by a newer snapshot (`settlement_days`,
/// or a `settlements` row a worker of the release before migration 0018 wrote), and since its
/// input was fixed (`fixed_in`, the run's `revision_snapshot`) a revision committed before this
/// statement changed a PAID row of its input on one of the other days, the days it would take
/// (the row's old or new share falls on one).
///
/// Days are ordered by the snapshot each job's input was fixed in ("newest input wins day by
/// day"), but a job publishes its input as the table holds it at its finalize: its batches read
/// the changes committed before them, and [`sum_revisions`] adds those committed after. A row
/// moved from a day the newer job holds into the older job's days after the newer job read it
/// would count on both. Such a job starts over ([`SettleError::Revised`], as after a TRUNCATE):
/// it fixes an input newer than every one published, and wins every day of its range. Where
/// nothing changed on the days it takes, they are exactly its input snapshot's, ordered as it
/// is, and it publishes them (a change on the newer input's days only leaves its own alone).
///
/// The look is at every revision since the input, not at the correction alone: a change
/// committed before a batch read the row needs no correction, yet the batch read it newer than
/// the input. It runs after the correction: a revision committed in between is counted here
/// too (a start-over it may not have needed), never one the sums hold and this missed.
///
/// A job no newer input overlaps is never sent back: it takes every day of its range, the
/// table as its finalize holds it, newer than anything published before it ([`finalize`]
/// serializes them). A job starts over again each time a newer overlapping job finishes ahead
/// of it while its days keep changing: only a stream of such jobs keeps it from finishing.
/// A run fixed before revisions were kept by row (no `revision_snapshot`) needs no look: any
/// revision of its input starts it over already ([`sum_revisions`]).
async fn revised_beside_a_newer_input(
    tx: &mut PgConnection,
    plan: &Plan,
    fixed_in: &str,
) -> Result<bool, sqlx::Error> {
    let run = &plan.run;
    // The days held as `replace_settlements` finds them (one plan per day: a range's days are
    // few); the revisions from the oldest the input may lack on, as `sum_revisions` reads them.
    sqlx::query_scalar!(
        r#"with held as materialized (
               select day::date as date
               from generate_series($2::date, $3::date, interval '1 day') as day
               where exists (select from settlement_days as newer
                             where newer.date = day::date and newer.snapshot_id > $1)
                  or exists (select from settlements as newer
                             where newer.date = day::date and newer.date between $2 and $3
                               and newer.snapshot_id > $1)
           )
           select exists (select from held)
              and exists (
                  select from transaction_revisions as r,
                       lateral (values (r.old_status, r.old_paid_at),
                                       (r.new_status, r.new_paid_at)) as c (status, paid_at),
                       lateral (select (c.paid_at at time zone $6)::date as day) as paid
                  where r.xid >= pg_snapshot_xmin($4::text::pg_snapshot)
                    and not pg_visible_in_snapshot(r.xid, $4::text::pg_snapshot)
                    and r.txn_id > 0 and r.txn_id <= $5
                    and (r.old_merchant_id, r.old_status, r.old_paid_at, r.old_amount_cents,
                         r.old_fee_cents)
                        is distinct from (r.new_merchant_id, r.new_status, r.new_paid_at,
                                          r.new_amount_cents, r.new_fee_cents)
                    and c.status = 'PAID' and paid.day between $2 and $3
                    and paid.day not in (select date from held)) as "revised!""#,
        run.snapshot_id,
        run.from_date,
        run.to_date,
        fixed_in,
        run.high_water_id,
        run.time_zone,
    )
    .fetch_one(tx)
    .await
}

/// True when each part's recorded reads hold every row its batches counted as read.
async fn reads_account_for_parts(tx: &mut PgConnection, plan: &Plan) -> Result<bool, sqlx::Error> {
    let read: Vec<i64> = sqlx::query_scalar!(
        r#"select coalesce((select sum(scanned) from settlement_reads as r
                            where r.job_id = p.job_id and r.part = p.part), 0)::int8 as "read!"
           from settlement_parts as p where p.job_id = $1 order by p.part"#,
        plan.run.job_id,
    )
    .fetch_all(tx)
    .await?;
    let processed = plan.parts.iter().map(|part| part.processed);
    Ok(read.len() == plan.parts.len() && read.into_iter().eq(processed))
}

/// Writes the job's sums into `settlements`, built from the input snapshot `snapshot_id` (see
/// [`super::plan::Mark`]). Newest input wins, day by day: the job takes the days of its range
/// that no newer snapshot has settled (recorded in `settlement_days`, migration 0018), and on
/// those days its sums are inserted, or updated in place (see migration 0007), and every other
/// row goes (its merchant-day has no PAID transaction in this newer input). A day a newer job
/// settled stays as that job left it, whichever job finishes last, rows it removed included;
/// so does a day with a row from a newer snapshot that `settlement_days` does not know of (a
/// worker of the release before migration 0018 wrote it during a rolling upgrade).
/// The casts to bigint fail (SQLSTATE 22003) rather than wrap when a sum leaves the 64-bit
/// range. The sums are the parts' with the [`parts::REVISED_PART`] row's corrections (see
/// [`sum_revisions`]); a merchant-day they leave with no transaction has no row.
///
/// First it takes [`lock_settlements`] (held already when [`finalize`] calls it), so
/// overlapping jobs finishing at once cannot interleave their deletes and inserts.
pub async fn replace_settlements(
    conn: &mut PgConnection,
    job_id: i64,
    snapshot_id: i64,
    range: DateRange,
) -> Result<(), sqlx::Error> {
    lock_settlements(conn).await?;
    // A MERGE joins the sums to the range's rows in one hash join, where `insert … on
    // conflict` probed the unique index once per row (the update's share of the statement,
    // 30,000 merchant-days: 50-75 ms against 100-165). It has no conflict handling of its own:
    // the lock above keeps any other replacement from inserting a key between its join and its
    // insert. The planner takes the unnested sums for 10 rows and would probe the date index
    // once per merchant-day (8 s for 30,000, measured) or sort them by merchant: only this
    // statement plans without nested loops and sorts.
    let planner = sqlx::query!(
        r#"select current_setting('enable_nestloop') as "nestloop!",
                  current_setting('enable_sort') as "sort!""#
    )
    .fetch_one(&mut *conn)
    .await?;
    super::set_local(conn, &[("enable_nestloop", "off"), ("enable_sort", "off")]).await?;
    sqlx::query!(
        "merge into settlements as s
         using (select m, d, sum(g)::int8 as g, sum(f)::int8 as f, (sum(g) - sum(f))::int8 as net,
                       sum(n)::int8 as n
                from settlement_batches as b,
                     unnest(b.merchant_ids, b.dates, b.gross_cents, b.fee_cents, b.txn_counts)
                         as u(m, d, g, f, n)
                where b.job_id = $1
                  and not exists (select from settlement_days as day
                                  where day.date = u.d and day.snapshot_id > $2)
                  and not exists (select from settlements as newer
                                  where newer.date = u.d and newer.date between $3 and $4
                                    and newer.snapshot_id > $2)
                group by m, d
                having sum(n) > 0) as sums
         on s.merchant_id = sums.m and s.date = sums.d and s.date between $3 and $4
         when matched then update set
             gross_cents = sums.g, fee_cents = sums.f, net_cents = sums.net, txn_count = sums.n,
             job_id = $1, generated_at = now(), snapshot_id = $2
         when not matched then insert
             (merchant_id, date, gross_cents, fee_cents, net_cents, txn_count, job_id,
              snapshot_id)
             values (sums.m, sums.d, sums.g, sums.f, sums.net, sums.n, $1, $2)",
        job_id,
        snapshot_id,
        range.from(),
        range.to(),
    )
    .execute(&mut *conn)
    .await?;
    let restored = [
        ("enable_nestloop", planner.nestloop.as_str()),
        ("enable_sort", planner.sort.as_str()),
    ];
    super::set_local(conn, &restored).await?;
    // The days no newer snapshot settled become this job's, and their rows it did not write go
    // (read through the range's bound: the planner takes `taken` for a thousand days, and
    // would hash all of `settlements`, every day of history, to join them).
    sqlx::query!(
        "with taken as (
             insert into settlement_days (date, snapshot_id, job_id)
             select day::date, $2, $1
             from generate_series($3::date, $4::date, interval '1 day') as day
             where not exists (select from settlements as newer
                               where newer.date = day::date and newer.date between $3 and $4
                                 and newer.snapshot_id > $2)
             on conflict (date) do update set snapshot_id = excluded.snapshot_id, job_id = $1
                 where settlement_days.snapshot_id <= excluded.snapshot_id
             returning date)
         delete from settlements as s using taken
         where s.date = taken.date and s.date between $3 and $4 and s.job_id <> $1",
        job_id,
        snapshot_id,
        range.from(),
        range.to(),
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes the transaction lock that serializes the jobs' finalizes (and any replacement of
/// `settlements`), released at commit; taken again by the same transaction, it returns at once.
/// A worker of the release before takes it only for its replacement, after its correction.
pub async fn lock_settlements(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query!("select pg_advisory_xact_lock(hashtextextended('settle:settlements', 0))")
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
    sqlx::query!("vacuum (skip_locked) settlement_batches, settlements")
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes the noted revisions of `transactions` (migration 0019) no job can still need: older
/// than `retention_hours`, at or below every live run's mark (a run fixed before 0019 has none
/// and keeps them all), and seen by every live run's `revision_snapshot` (one committed after a
/// run fixed its input, its id drawn below the mark, may still be read by that run's
/// finalize). A job reads its mark before its run's row exists, so the age is what keeps
/// a revision such a job needs. Returns how many went.
pub async fn prune_revisions(
    conn: &mut PgConnection,
    retention_hours: i64,
) -> Result<u64, sqlx::Error> {
    let pruned = sqlx::query!(
        "delete from transaction_revisions
         where noted_at < now() - make_interval(hours => $1::int4)
           and id <= coalesce((select min(coalesce(revision_id, 0)) from settlement_runs),
                              (select max(id) from transaction_revisions))
           and not exists (select from settlement_runs as run
                           where not pg_visible_in_snapshot(transaction_revisions.xid,
                                                            run.revision_snapshot))",
        retention_hours as i32,
    )
    .execute(conn)
    .await?;
    Ok(pruned.rows_affected())
}

/// Deletes the job's batch sums, reads, parts and fixed input: after its finalize, or to forget a
/// cancelled or failed job's work (`settlements` and the results are untouched then: only a
/// committed [`finalize`] ever writes them). With `fence`, only if the job's run is still the
/// one stored (or resumed) under that claim's fence, so a holder that lost its lease cannot
/// delete its successor's; returns whether a run was deleted.
///
/// The run goes first, in a statement of its own: that waits for a batch still holding the run
/// `for share` ([`super::parts::lock_run`], a former owner whose lease ran out), and the
/// next statement's snapshot then sees the rows that batch committed. One statement would
/// read all three tables as they were before the wait and leave that batch's sums behind, for
/// the run that starts next to add to its own.
pub async fn delete_working_rows(
    conn: &mut PgConnection,
    job_id: i64,
    fence: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let runs = sqlx::query!(
        "delete from settlement_runs where job_id = $1 and ($2::bigint is null or fence = $2)",
        job_id,
        fence,
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if fence.is_some() && runs == 0 {
        return Ok(false);
    }
    sqlx::query!(
        "with batches as (delete from settlement_batches where job_id = $1),
              reads as (delete from settlement_reads where job_id = $1)
         delete from settlement_parts where job_id = $1",
        job_id,
    )
    .execute(conn)
    .await?;
    Ok(runs > 0)
}

/// Deletes the working rows of settlement jobs that are no longer live (FAILED after their last
/// attempt, or pruned): only a cancel or a fatal error cleans up after itself, so a job that
/// ran out of attempts would otherwise leave its partial sums behind forever.
/// The runs are read, with the claim fence each was stored under, before the queue is asked
/// which of their jobs are live, and each is deleted only if it still has that fence: a job
/// that was retried meanwhile stores its fresh run under a newer claim's fence, which this
/// leaves alone.
pub async fn delete_abandoned_working_rows(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let mut abandoned: Vec<(i64, i64)> = sqlx::query!("select job_id, fence from settlement_runs")
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|run| (run.job_id, run.fence))
        .collect();
    let ids: Vec<i64> = abandoned.iter().map(|&(job_id, _)| job_id).collect();
    let live = settle_workers::read::live_jobs(conn, &ids).await?;
    abandoned.retain(|(job_id, _)| !live.contains(job_id));
    let mut deleted = 0;
    for &(job_id, fence) in &abandoned {
        deleted += u64::from(delete_working_rows(conn, job_id, Some(fence)).await?);
    }
    Ok(deleted)
}
