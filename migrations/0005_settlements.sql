-- Settlement: the per-merchant, per-day results, and the durable state of running settlement
-- jobs (their fixed input, one cursor per parallel id sub-range, and each batch's partial sums).
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
    -- The queue's claim counter of the worker running the job, set in its fenced first batch.
    -- Part batches lock this row `for share` with their fence, so a new owner's update waits
    -- for a former owner's batch in flight and shuts it out afterwards, without part batches
    -- ever blocking the jobs row (heartbeats, checkpoints).
    fence         bigint      not null default 0,
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
    -- Every id in (lo_id, cursor_id] is in settlement_batches.
    cursor_id  bigint not null,
    processed  bigint not null default 0,
    primary key (job_id, part),
    constraint settlement_part_cursor_in_range check (cursor_id between lo_id and hi_id),
    constraint settlement_part_processed_not_negative check (processed >= 0)
);

-- Partial sums, one row per committed batch: the batch's (merchant, day) groups as parallel
-- arrays. One plain insert per batch instead of an upsert per group (measured: upserting the
-- ~28,000 groups of a 100,000-row batch cost 200-600 ms, more than aggregating the batch), and
-- parts never touch each other's rows. Sums are bigint: amounts are not negative, so a batch
-- sum that overflows means the total would too, and the cast reports it.
create table settlement_batches (
    job_id        bigint   not null,
    part          int      not null,
    -- The batch's last id; the part's cursor moved here in the same transaction.
    end_id        bigint   not null,
    -- Transactions the batch read (any status or day): the job's progress.
    scanned       bigint   not null,
    merchant_ids  text[]   not null,
    dates         date[]   not null,
    gross_cents   bigint[] not null,
    fee_cents     bigint[] not null,
    txn_counts    bigint[] not null,
    primary key (job_id, part, end_id),
    constraint settlement_batch_arrays_aligned check (
        cardinality(merchant_ids) = cardinality(dates)
        and cardinality(dates) = cardinality(gross_cents)
        and cardinality(gross_cents) = cardinality(fee_cents)
        and cardinality(fee_cents) = cardinality(txn_counts)
    )
);
-- Uncompressed out-of-line arrays: pglz compression of a batch's ~1 MB of arrays cost 35 ms per
-- batch (a third of the batch), for rows that live only until the job finishes.
alter table settlement_batches
    alter column merchant_ids set storage external,
    alter column dates set storage external,
    alter column gross_cents set storage external,
    alter column fee_cents set storage external,
    alter column txn_counts set storage external;

-- The planner's group estimate for (merchant, day): without it Postgres multiplies the
-- per-column estimates (10M groups instead of 30,000) and sorts on disk instead of hashing.
-- The day expression must match the job's SQL text exactly; zones other than UTC get their
-- own statistics object, created by the job when it first starts.
create statistics transactions_merchant_day_utc (ndistinct)
    on merchant_id, ((paid_at at time zone 'UTC')::date) from transactions;
