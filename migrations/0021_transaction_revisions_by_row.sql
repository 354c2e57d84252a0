-- A settlement no longer starts over when stored rows change while it runs: it corrects its
-- sums by the changes its batches did not see (`finalize::sum_revisions`). Since 0019 each
-- statement that changed or removed rows of `transactions` left one revision naming the times
-- it touched, and a job whose input such a statement touched summed those days again, or, past
-- `settlement.revised_days_max` days, started over: refunds spread over a month kept a
-- month's job from ever finishing. Now each changed or removed row leaves a revision with the
-- row as it was and as it became, and the transaction that changed it; each batch that counted
-- rows records the snapshot it read them in (`settlement_reads`). A revision its batch's
-- snapshot did not see, committed before the finalize, moves the sums by the new row's share
-- less the old one's: the job publishes the input as the finalize's snapshot holds it, however
-- many days the changes touched, at the cost of reading the revisions, not the rows.

alter table transaction_revisions
    -- The transaction that made the change (a TRUNCATE's too): whether a batch's snapshot saw it.
    add column xid xid8,
    -- The changed row's id; null for a TRUNCATE (its job starts over).
    add column txn_id bigint,
    -- The row before the change (null columns for none) and after it (null for a deletion).
    add column old_merchant_id text,
    add column old_status text,
    add column old_paid_at timestamptz,
    add column old_amount_cents bigint,
    add column old_fee_cents bigint,
    add column new_merchant_id text,
    add column new_status text,
    add column new_paid_at timestamptz,
    add column new_amount_cents bigint,
    add column new_fee_cents bigint;

-- A finalize reads the revisions from the oldest its run's input may lack on (the xmin of its
-- `revision_snapshot`).
create index transaction_revisions_xid on transaction_revisions (xid);

-- One revision per row. `paid_from`, `paid_to` and `low_id` are still filled, for a worker of
-- the release before, running during a rolling upgrade, that sums the touched days again.
create or replace function note_transaction_revision() returns trigger language plpgsql as $$
begin
    if tg_op = 'TRUNCATE' then
        insert into transaction_revisions (paid_from, paid_to, low_id, xid)
        values ('-infinity', 'infinity', 0, pg_current_xact_id());
    elsif tg_op = 'UPDATE' then
        insert into transaction_revisions
            (paid_from, paid_to, low_id, xid, txn_id,
             old_merchant_id, old_status, old_paid_at, old_amount_cents, old_fee_cents,
             new_merchant_id, new_status, new_paid_at, new_amount_cents, new_fee_cents)
        -- A changed id is the old row removed and the new one added.
        select least(o.paid_at, n.paid_at), greatest(o.paid_at, n.paid_at), coalesce(o.id, n.id),
               pg_current_xact_id(), coalesce(o.id, n.id),
               o.merchant_id, o.status, o.paid_at, o.amount_cents, o.fee_cents,
               n.merchant_id, n.status, n.paid_at, n.amount_cents, n.fee_cents
        from revised_old as o full join revised_new as n on n.id = o.id;
    else
        insert into transaction_revisions
            (paid_from, paid_to, low_id, xid, txn_id,
             old_merchant_id, old_status, old_paid_at, old_amount_cents, old_fee_cents)
        select o.paid_at, o.paid_at, o.id, pg_current_xact_id(), o.id,
               o.merchant_id, o.status, o.paid_at, o.amount_cents, o.fee_cents
        from revised_old as o;
    end if;
    return null;
end
$$;

-- The snapshot the job fixed its input in: a change it does not see was committed later, and
-- may have been read by some batches and not others (null for a run fixed before this
-- migration, which starts over when a revision touched its input, as the release before did
-- past its days).
alter table settlement_runs add column revision_snapshot pg_snapshot;

-- The snapshot each batch that counted rows of the input read them in, over the ids it read,
-- `(lo_id, hi_id]`, and the rows it read there. Deleted with the job's other working rows.
create table settlement_reads (
    job_id   bigint      not null,
    part     int         not null,
    lo_id    bigint      not null,
    hi_id    bigint      not null,
    scanned  bigint      not null,
    snapshot pg_snapshot not null,
    -- Parts are disjoint: a row's read is the one of the greatest `lo_id` below its id.
    primary key (job_id, lo_id)
);
