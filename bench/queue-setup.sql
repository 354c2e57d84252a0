-- `settle bench queue`'s independent baseline, set-up (psql -v jobs=N): the table a minimal
-- hand-written queue would have - the jobs table's columns and defaults, a primary key and a
-- partial index of the due jobs, no trigger, finished jobs kept in place - holding N queued
-- no-op jobs.
set client_min_messages = warning;
drop table if exists pgbench_jobs;
create table pgbench_jobs (like jobs including defaults including identity);
alter table pgbench_jobs add primary key (id);
create index on pgbench_jobs (priority desc, run_at, id) where state = 'queued';
insert into pgbench_jobs (kind) select 'noop' from generate_series(1, :jobs);
