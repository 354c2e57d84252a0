-- no-transaction
-- The id span of a settlement's days without reading their rows: for each quarter hour of
-- paid_at (UTC-aligned; every zone's midnight falls on one today), the lowest and the highest id
-- paid within it are the two ends of its entries here, so a range's span is two index probes
-- per quarter hour (input::bucket_span) instead of a pass over the range's `(paid_at, id)`
-- entries. What it costs (a fourth index on transactions) and why: docs/adr/0002-settlement-input.md.
-- Built concurrently, outside a transaction (the directive above), so that on a large table
-- (77.6 s at 100M rows) ingestion goes on meanwhile. If the build is interrupted, Postgres
-- leaves the index INVALID and this migration unrecorded: drop the index, then migrate again.
create index concurrently transactions_paid_bucket_id_idx
    on transactions (date_bin('15 minutes', paid_at, timestamptz '2000-01-01 00:00:00+00'), id);
