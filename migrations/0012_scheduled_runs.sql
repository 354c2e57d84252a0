-- The daily schedule (src/schedule.rs): one row per schedule and day it enqueued a job for,
-- inserted in the transaction that enqueues the job. The primary key makes that enqueue happen
-- once however many workers try at the same moment, restart or die mid-way: a second insert
-- waits for the first transaction, then conflicts (or, if the first rolled back, takes its
-- place). No foreign key to jobs: retention deletes old jobs, and their days stay done.
create table scheduled_runs (
    schedule    text        not null,
    day         date        not null,
    job_id      bigint      not null,
    created_at  timestamptz not null default now(),
    constraint scheduled_run_once_per_day primary key (schedule, day)
);
