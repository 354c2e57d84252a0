-- A row inserted at an id a running job's input spans (at or below its high-water id) is a
-- change of that input too: a row deleted and put back under its own id while a job ran, or
-- restored after its batch read past it, was subtracted by the deletion's revision and never
-- added back, as inserts left none. Such an insert now leaves a revision with no old row, the
-- new one only, which the finalize's correction adds where its batch did not see it (as it
-- does the new row of a changed id). Inserts above every running job's mark, all ordinary
-- ingestion, leave none. `paid_from`, `paid_to` and `low_id` are filled as 0021's are, for a
-- worker of the release before.

create function note_transaction_insert() returns trigger language plpgsql as $$
begin
    insert into transaction_revisions
        (paid_from, paid_to, low_id, xid, txn_id,
         new_merchant_id, new_status, new_paid_at, new_amount_cents, new_fee_cents)
    select n.paid_at, n.paid_at, n.id, pg_current_xact_id(), n.id,
           n.merchant_id, n.status, n.paid_at, n.amount_cents, n.fee_cents
    from revised_new as n
    where n.id <= (select max(high_water_id) from settlement_runs);
    return null;
end
$$;

create trigger transactions_inserted after insert on transactions
    referencing new table as revised_new
    for each statement execute function note_transaction_insert();
