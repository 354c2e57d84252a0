-- Finished jobs (COMPLETED, FAILED, CANCELLED) get a table of their own: the statement that
-- ends a job deletes its row from `jobs` and inserts it here, in one statement. `jobs` then holds
-- only live jobs (queued, running, cancelling), so
-- - an ending writes no new version into `jobs` and none of its indexes (a delete only marks
--   the row), and `jobs` needs no index for listing or pruning finished jobs: the queue's hot
--   path touches the primary key and the two partial indexes of the claim, nothing else;
-- - `jobs` stays as small as the queue is deep, whatever the retention keeps, so vacuuming it is
--   cheap, and `finished_jobs` only ever grows at its end (until retention prunes its oldest).
-- A job keeps its id across the move (and back, when a FAILED or CANCELLED job is retried), so
-- both tables draw ids from `jobs`' identity and an id is in exactly one of them.

create table finished_jobs (like jobs including defaults including constraints);
alter table finished_jobs
    add primary key (id),
    alter column id set default nextval(pg_get_serial_sequence('jobs', 'id')::regclass),
    add constraint finished_job_state check (state in ('completed', 'failed', 'cancelled'));

-- Settlement results go with their job when retention deletes it (0009): from now on that is a
-- delete from finished_jobs, while a delete from jobs is a job ending. (A retry, moving a FAILED
-- or CANCELLED job back to jobs, also deletes whatever results it had: the restarted settlement
-- starts over without a checkpoint and replaces them anyway.) Moved before the rows are, so
-- moving them deletes nothing.
drop trigger settlement_results_follow_jobs on jobs;
create trigger settlement_results_follow_jobs after delete on finished_jobs
    referencing old table as gone
    for each statement execute function settlement_results_follow_jobs();

with moved as (
    delete from jobs where state in ('completed', 'failed', 'cancelled') returning *
)
insert into finished_jobs select * from moved;

alter table jobs add constraint live_job_state check (state in ('queued', 'running', 'cancelling'));

-- GET /api/v1/jobs over finished jobs: newest first, optionally by state or kind.
create index finished_jobs_state_id_idx on finished_jobs (state, id desc);
create index finished_jobs_kind_id_idx on finished_jobs (kind, id desc);
-- Retention prunes the oldest: rows arrive in finishing order, so a block range index is
-- enough and costs next to nothing per insert.
create index finished_jobs_finished_at_idx on finished_jobs using brin (finished_at);

-- Live jobs are few next to finished ones: listing them by state uses the claim's partial
-- indexes (queued, running/cancelling), by kind the primary key.
drop index jobs_state_id_idx;
drop index jobs_kind_id_idx;
drop index jobs_finished_at_idx;

-- Every job, live or finished, for reading (the API's get and list, tests): a plain union, so
-- a lookup by id or a newest-first page reads each table's own index.
create view all_jobs as
    select * from jobs
    union all
    select * from finished_jobs;
