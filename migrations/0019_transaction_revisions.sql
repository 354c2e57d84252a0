-- A settlement's input is what it reads, not only which rows: an operator fixing stored rows
-- (a status, an amount, a deletion) while a job runs was read by some of its batches and not
-- by others, and the job settled a state the table never held (the review of stop 33: one
-- row refunded and another paid in one statement, both counted). Each statement that changes
-- or removes rows of `transactions` now leaves a trace here; a job compares the traces newer
-- than its input with its range before it publishes, and starts over on a fresh input when
-- one of them touched it (`finalize::finalize`). Inserts leave none: the high-water mark
-- orders them already, and the ingestion path only inserts.
create table transaction_revisions (
    -- Ordered as the statements drew it: every revision drawn after a job read the largest
    -- one is above it (`input::fix_mark`).
    id        bigserial   primary key,
    -- The earliest and the latest `paid_at` the statement touched, before or after it.
    paid_from timestamptz not null,
    paid_to   timestamptz not null,
    -- The lowest id it touched: a job whose high-water id is below it never read those rows.
    low_id    bigint      not null
);

create function note_transaction_revision() returns trigger language plpgsql as $$
begin
    if tg_op = 'TRUNCATE' then
        insert into transaction_revisions (paid_from, paid_to, low_id)
        values ('-infinity', 'infinity', 0);
    elsif tg_op = 'UPDATE' then
        insert into transaction_revisions (paid_from, paid_to, low_id)
        select min(paid_at), max(paid_at), min(id)
        from (select paid_at, id from revised_old union all select paid_at, id from revised_new) r
        having count(*) > 0;
    else
        insert into transaction_revisions (paid_from, paid_to, low_id)
        select min(paid_at), max(paid_at), min(id) from revised_old
        having count(*) > 0;
    end if;
    return null;
end
$$;

-- Transition tables take one event per trigger.
create trigger transactions_updated after update on transactions
    referencing old table as revised_old new table as revised_new
    for each statement execute function note_transaction_revision();
create trigger transactions_deleted after delete on transactions
    referencing old table as revised_old
    for each statement execute function note_transaction_revision();
create trigger transactions_truncated after truncate on transactions
    for each statement execute function note_transaction_revision();

-- The largest revision when the job fixed its input; null for a run fixed before this
-- migration (its check reads every revision since).
alter table settlement_runs add column revision_id bigint;
