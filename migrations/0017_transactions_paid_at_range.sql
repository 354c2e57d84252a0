-- `paid_at` keeps a day away from the years 1 and 9999 (UTC), so its day in any zone is a day
-- of years 1 to 9999: one a CSV writes as YYYY-MM-DD (Postgres writes year 0 as `0001 BC`),
-- and one the per-zone statistics (migration 0005, `input::create_statistics`) can compute
-- (ANALYZE fails with "timestamp out of range" on an instant whose local time leaves the range,
-- and settlements refresh them). The API refuses such instants already; this holds every other
-- writer to it.
--
-- NOT VALID: rows stored before are not scanned (a large table would be read in full at
-- upgrade, and one stray row would stop the upgrade); new and updated rows are checked.
alter table transactions add constraint paid_at_in_range
    check (paid_at >= '0001-01-02 00:00:00+00' and paid_at < '9999-12-31 00:00:00+00') not valid;
