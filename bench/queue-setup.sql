-- `settle bench queue`'s independent baseline, set-up (psql -v jobs=N): a plain table of the jobs
-- table's shape (columns, defaults, constraints, indexes; no trigger) holding N queued no-op jobs.
set client_min_messages = warning;
drop table if exists pgbench_jobs;
create table pgbench_jobs (like jobs including all);
insert into pgbench_jobs (kind) select 'noop' from generate_series(1, :jobs);
