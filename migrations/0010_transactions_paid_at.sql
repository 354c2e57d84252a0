-- A settlement reads only the transactions paid within its days: this index finds them (and
-- the id span they occupy) without reading the table, so a one-day job on a year of history
-- costs about a day's rows, not the year's. Why an index and not partitioning by paid_at:
-- docs/adr/0002-settlement-input.md.
create index transactions_paid_at_id_idx on transactions (paid_at, id);
