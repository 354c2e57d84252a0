-- `settle bench queue`'s independent baseline (pgbench -M prepared -D batch=N -f this file, on the
-- table queue-setup.sql made): claim up to :batch due jobs with FOR UPDATE SKIP LOCKED, then
-- complete them, each statement its own transaction, as a minimal hand-written queue would.
with claimed as (
    select id from pgbench_jobs
    where state = 'queued' and run_at <= now()
    order by priority desc, run_at, id
    limit :batch
    for update skip locked
), started as (
    update pgbench_jobs j set
        state = 'running', attempt = j.attempt + 1, fence = j.fence + 1,
        lease_owner = 'pgbench', lease_expires_at = now() + interval '10 seconds',
        heartbeat_at = now(), started_at = coalesce(j.started_at, now())
    from claimed where j.id = claimed.id
    returning j.id
)
select coalesce(array_agg(id), '{}') as ids from started
\gset
update pgbench_jobs set
    state = 'completed', finished_at = now(), lease_owner = null, lease_expires_at = null
where id = any(:ids::bigint[]) and state = 'running';
