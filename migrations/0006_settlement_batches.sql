-- Settlement working state, second design (0005 is left as it was applied: migrations are
-- append-only).
--
-- 1. Parallel parts fence on the job's settlement_runs row instead of the jobs row, so a part
--    batch never blocks the queue's heartbeats and checkpoints.
-- 2. Partial sums are one row per committed batch instead of one upserted row per
--    (part, merchant, day) group.

-- The queue's claim counter of the worker running the job, set in its fenced first batch.
-- Part batches lock this row `for share` with their fence, so a new owner's update waits for a
-- former owner's batch in flight and shuts it out afterwards, without part batches ever
-- blocking the jobs row (heartbeats, checkpoints).
alter table settlement_runs add column fence bigint not null default 0;

-- Every id in (lo_id, cursor_id] of a part is now in settlement_batches.
comment on column settlement_parts.cursor_id is
    'every id in (lo_id, cursor_id] is in settlement_batches';

drop table settlement_partials;

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
