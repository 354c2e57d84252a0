-- Every transaction carries the payment provider's id for it, unique per merchant, so a client
-- re-sending a batch after a lost response cannot store (and settle) the same payment twice.
--
-- Rows stored before this release had no such id: they get 'legacy-<id>', unique and stable,
-- so nothing is lost and they can never collide with a provider id sent later (which a client
-- would have to spell exactly that way). No default afterwards: every writer, the API, `seed`
-- and a bulk COPY alike, must say which payment a row is.

alter table transactions add column external_id text;
update transactions set external_id = 'legacy-' || id;
alter table transactions alter column external_id set not null;

-- 1 to 128 visible ASCII characters (what the API accepts).
alter table transactions add constraint transaction_external_id_format
    check (external_id ~ '^[!-~]{1,128}$');

-- The identity the API deduplicates on. External id first: provider ids are near-unique on
-- their own, and ids a feed assigns in order then append to the index instead of landing on
-- one leaf per merchant (measured: a 10M-row seed COPY took 115 s with (merchant_id,
-- external_id), the leaves of 1,000 merchants churning through shared_buffers).
alter table transactions add constraint transactions_merchant_external_id_key
    unique (external_id, merchant_id);
