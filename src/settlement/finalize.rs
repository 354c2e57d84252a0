//! Step 3 of a settlement job: finalize. In the transaction that completes the job, the job's
//! sums replace the range's rows of `settlements` (never a row built from a newer input) and
//! become the job's result ([`super::results`]); its working rows go. A cancelled or failed job
//! forgets them instead ([`delete_working_rows`]), and jobs that ended without either are swept
//! by [`delete_abandoned_working_rows`].

use sqlx::PgConnection;

use chrono::NaiveDate;

use super::plan::Plan;
use super::{DateRange, Settings, SettleError};
use super::{input, parts, results};

/// Writes the job's sums into `settlements` where no newer input's rows stand (see
/// [`replace_settlements`]), once the stored parts are as the run left them
/// ([`SettleError::Behind`] where a crash took their last batches) and the sums are of one state
/// of the input ([`converge`]; [`SettleError::Revised`] where they could not be made so),
/// stores the range's rows as the job's result (its CSV), and deletes the job's working rows,
/// all in `tx`: the caller commits them with the job's completion, so the table, the result
/// and COMPLETED land together or not at all. Returns the result's row count.
pub async fn finalize(
    tx: &mut PgConnection,
    plan: &Plan,
    settings: &Settings,
) -> Result<u64, SettleError> {
    // The parts as stored, or the sums lack what a crash took of their last batches.
    if super::plan::get_parts(tx, plan.run.job_id).await? != plan.parts {
        return Err(SettleError::Behind);
    }
    let revised = converge(tx, plan, settings.revised_days_max).await?;
    super::set_local_tuning(tx).await?;
    replace_settlements(
        tx,
        plan.run.job_id,
        plan.run.snapshot_id,
        plan.range(),
        &revised,
    )
    .await
    .map_err(SettleError::from_sum)?;
    let rows = results::store(tx, plan.run.job_id, plan.range()).await?;
    delete_working_rows(tx, plan.run.job_id, None).await?;
    Ok(rows)
}

/// Rounds of [`converge`] before it gives up on rows that keep changing.
const CONVERGE_ROUNDS: usize = 5;

/// Makes the job's sums those of one state of its input, in the finalize's transaction: where
/// statements changed or removed stored rows of the input since the run fixed it (each leaves
/// a `transaction_revisions` row, migration 0019), the batches may have read some of those rows
/// before the change and others after, so the days they touched are summed again from the
/// table ([`parts::sum_revised_days`]); `replace_settlements` takes those days from these sums
/// only. Each round reads the revisions its statement's snapshot holds, then sums the days, in
/// a later snapshot, which holds those revisions and maybe newer ones: a round that finds no
/// revision it did not handle already shows that the table held, for the input, exactly what
/// the sums read, the revised days as summed last and every other day as the batches read it
/// (no revision touched it). Returns the days summed again (none where nothing changed).
///
/// [`SettleError::Revised`] when the revised days are more than `max_days`, or rows still
/// changed after [`CONVERGE_ROUNDS`] rounds: the job starts over. Changes committed after the
/// last round were read by none of it. Runs at READ COMMITTED, each statement in a snapshot of
/// its own.
async fn converge(
    tx: &mut PgConnection,
    plan: &Plan,
    max_days: i64,
) -> Result<Vec<NaiveDate>, SettleError> {
    let mut handled: Vec<i64> = Vec::new();
    let mut days: Vec<NaiveDate> = Vec::new();
    for _ in 0..CONVERGE_ROUNDS {
        let found = input::revisions_since(tx, plan, &handled).await?;
        if found.ids.is_empty() {
            return Ok(days);
        }
        handled.extend(found.ids);
        days.extend(found.days);
        days.sort_unstable();
        days.dedup();
        if days.len() as i64 > max_days {
            return Err(SettleError::Revised);
        }
        parts::sum_revised_days(tx, plan, &days)
            .await
            .map_err(SettleError::from_sum)?;
    }
    Err(SettleError::Revised)
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
/// range. On the `revised` days the sums are the job's [`parts::REVISED_PART`] row's only
/// (those days summed again as the table holds them, see [`converge`]), on every other day the
/// parts'.
///
/// First it takes a transaction lock that serializes replacements, so overlapping jobs
/// finishing at once cannot interleave their deletes and inserts; it is released at commit.
pub async fn replace_settlements(
    conn: &mut PgConnection,
    job_id: i64,
    snapshot_id: i64,
    range: DateRange,
    revised: &[NaiveDate],
) -> Result<(), sqlx::Error> {
    sqlx::query!("select pg_advisory_xact_lock(hashtextextended('settle:settlements', 0))")
        .execute(&mut *conn)
        .await?;
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
                where b.job_id = $1 and (b.part = $6) = (u.d = any($5))
                  and not exists (select from settlement_days as day
                                  where day.date = u.d and day.snapshot_id > $2)
                  and not exists (select from settlements as newer
                                  where newer.date = u.d and newer.date between $3 and $4
                                    and newer.snapshot_id > $2)
                group by m, d) as sums
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
        revised,
        parts::REVISED_PART,
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
/// than `retention_hours` and at or below every live run's mark (a run fixed before 0019 has
/// none and keeps them all). A job reads its mark before its run's row exists, so the age is
/// what keeps a revision such a job needs; one committed after its id was drawn is younger
/// still. Returns how many went.
pub async fn prune_revisions(
    conn: &mut PgConnection,
    retention_hours: i64,
) -> Result<u64, sqlx::Error> {
    let pruned = sqlx::query!(
        "delete from transaction_revisions
         where noted_at < now() - make_interval(hours => $1::int4)
           and id <= coalesce((select min(coalesce(revision_id, 0)) from settlement_runs),
                              (select max(id) from transaction_revisions))",
        retention_hours as i32,
    )
    .execute(conn)
    .await?;
    Ok(pruned.rows_affected())
}

/// Deletes the job's batch sums, parts and fixed input: after its finalize, or to forget a
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
        "with batches as (delete from settlement_batches where job_id = $1)
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
