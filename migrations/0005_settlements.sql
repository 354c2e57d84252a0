-- Settlement: the per-merchant, per-day results, and the durable state of running settlement
-- jobs (their fixed input, one cursor per parallel id sub-range, and their partial sums).
-- job_id columns name jobs.id but carry no foreign key: settlements outlive pruned jobs, and the
-- job's own code deletes its working rows when it finishes, fails or is cancelled.

create table settlements (
    merchant_id   text        not null,
    date          date        not null,
    gross_cents   bigint      not null,
    fee_cents     bigint      not null,
    net_cents     bigint      not null,
    txn_count     bigint      not null,
    generated_at  timestamptz not null default now(),
    -- The job whose run wrote this row.
    job_id        bigint      not null,
    constraint settlements_merchant_date_key unique (merchant_id, date),
    constraint settlement_net_is_gross_minus_fee check (net_cents = gross_cents - fee_cents),
    constraint settlement_sums_not_negative check (fee_cents >= 0 and net_cents >= 0 and txn_count > 0)
);
-- The job's own CSV and replace step read a date range.
create index settlements_date_idx on settlements (date);

-- A job's fixed input, written once when it first starts: it settles transactions with
-- id <= high_water_id only, so a resumed job sees exactly the rows it started with.
create table settlement_runs (
    job_id        bigint      primary key,
    from_date     date        not null,
    to_date       date        not null,
    time_zone     text        not null,
    high_water_id bigint      not null,
    -- Rows with id <= high_water_id: what `processed` counts towards.
    total         bigint      not null,
    created_at    timestamptz not null default now(),
    constraint settlement_run_range_ordered check (from_date <= to_date),
    constraint settlement_run_total_not_negative check (total >= 0)
);

-- One disjoint id sub-range (lo, hi] of a job, processed by its own task with its own keyset
-- cursor, so one job can aggregate on several cores at once.
create table settlement_parts (
    job_id     bigint not null,
    part       int    not null,
    lo_id      bigint not null,
    hi_id      bigint not null,
    -- Every id in (lo_id, cursor_id] has been aggregated into settlement_partials.
    cursor_id  bigint not null,
    processed  bigint not null default 0,
    primary key (job_id, part),
    constraint settlement_part_cursor_in_range check (cursor_id between lo_id and hi_id),
    constraint settlement_part_processed_not_negative check (processed >= 0)
);

-- Partial sums per (job, part, merchant, day). Keyed by part as well so parallel parts never
-- update the same row (which would serialize them and invite deadlocks). numeric, so no
-- intermediate sum wraps; the final cast to bigint is where overflow is caught.
create table settlement_partials (
    job_id       bigint  not null,
    part         int     not null,
    merchant_id  text    not null,
    date         date    not null,
    gross_cents  numeric not null,
    fee_cents    numeric not null,
    txn_count    bigint  not null,
    primary key (job_id, part, merchant_id, date)
);

-- The planner's group estimate for (merchant, day): without it Postgres multiplies the
-- per-column estimates (10M groups instead of 30,000) and sorts on disk instead of hashing.
-- The day expression must match the job's SQL text exactly; zones other than UTC get their
-- own statistics object, created by the job when it first starts.
create statistics transactions_merchant_day_utc (ndistinct)
    on merchant_id, ((paid_at at time zone 'UTC')::date) from transactions;
