-- The newest input wins, also after the data was fixed.
--
-- Until now a job's input snapshot was its high-water id, `max(id)` of `transactions`. That
-- orders inputs only while rows are inserted: an operator who refunds or deletes rows and
-- settles the days again fixes the same high-water id (no new row) or a lower one (the newest
-- rows deleted), so the re-run kept rows it should replace (a merchant-day left with no PAID
-- transaction stayed) or replaced nothing. And a job's deletions left no trace: an older job
-- finishing later put back a merchant-day the newer one had found empty.
--
-- 1. A job's snapshot is now its place in the order jobs fixed their inputs, drawn from this
--    sequence together with its high-water id (under a lock, so a later snapshot never has a
--    lower high-water id while rows are only inserted), and kept above that id (so it is newer
--    than what a worker of the release before, still running during a rolling upgrade, records:
--    its high-water id). It starts above every snapshot and high-water id stored so far, so
--    every job from now on supersedes them.
create sequence settlement_snapshots;
select setval('settlement_snapshots',
              greatest(1,
                       (select max(snapshot_id) from settlements),
                       (select max(high_water_id) from settlement_runs)));

-- A job fixed by the release before (before this migration, or by one of its workers still
-- running during a rolling upgrade, which names no snapshot) has its high-water id as its
-- snapshot, the order it had: null here, read as that id (`plan::get_run`).
alter table settlement_runs add column snapshot_id bigint;

-- 2. For each day, the newest snapshot that settled it, and the job that did. A job replaces a
--    day's rows (all merchants: a job settles every merchant of its days) only where no newer
--    snapshot has settled that day, and records itself here in the same transaction.
create table settlement_days (
    date        date   primary key,
    snapshot_id bigint not null,
    job_id      bigint not null
);

insert into settlement_days (date, snapshot_id, job_id)
select date, max(snapshot_id), (array_agg(job_id order by snapshot_id desc))[1]
from settlements
group by date;
