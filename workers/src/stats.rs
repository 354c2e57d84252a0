//! The queue at a glance, for metrics: how many jobs each kind has in each state, and how long
//! the oldest due job of each kind has waited. One statement, cheap however many finished jobs
//! are retained:
//! - the live states (queued, running, cancelling) are counted exactly: they are the `jobs`
//!   table, finished jobs having a table of their own, so the cost follows the backlog;
//! - a finished state (completed, failed, cancelled) is counted up to `exact_up_to` rows from
//!   `finished_jobs_state_id_idx` alone (an index-only scan). Under that, its rows are counted
//!   by kind, exactly. At or past it, the count is Postgres' own estimate (the planner's: the
//!   state's share in the table's statistics times the table's current size; autovacuum's
//!   ANALYZE keeps the share fresh), at least `exact_up_to`, split across kinds as among the
//!   state's newest [`SPLIT_SAMPLE`] rows. So a scrape reads a bounded number of rows whatever
//!   the table holds. Retention keeps finished jobs for `worker.retention_hours`; how many
//!   finish is the exact `settle_jobs_finished_total` counter.
//!
//! Measured (issue 10): 1,000,000 finished jobs (900,000 completed, 50,000 failed, 50,000
//! cancelled, two kinds) and 1,000 queued, vacuumed and analyzed, on the shared 2-core
//! development machine under load (load average 11, five builds running): this statement ran
//! in 55-68 ms (EXPLAIN ANALYZE, timing off; 46-93 ms end to end in psql), every estimate
//! within 4 % of the true count; a plain `count(*) … group by kind, state` took 480-580 ms on
//! the same data, and grows with the table where this does not. The API caches a reading for
//! a second, so scrapes cost at most one statement a second.
//!
//! The data, on a migrated database (then `vacuum analyze finished_jobs`, as autovacuum would;
//! measured when finished and live jobs shared one table):
//! ```sql
//! insert into finished_jobs (kind, args, state, attempt, started_at, finished_at, created_at)
//! select case when g % 3 = 0 then 'settlement' else 'noop' end, '{}',
//!        case when g % 20 = 0 then 'failed' when g % 20 = 1 then 'cancelled'
//!             else 'completed' end::job_state,
//!        1, now() - interval '1 day', now() - interval '1 day' + g * interval '1 ms',
//!        now() - interval '1 day'
//! from generate_series(1, 1000000) g;
//! insert into jobs (kind, args) select 'noop', '{}' from generate_series(1, 1000);
//! ```

use sqlx::PgConnection;

use crate::state::JobState;

/// Finished rows of one state counted exactly before the estimate takes over.
pub const EXACT_UP_TO: i64 = 10_000;

/// Newest rows of an estimated state whose kinds split its estimate.
pub const SPLIT_SAMPLE: i64 = 1_000;

/// Jobs of one kind in one state.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StateCount {
    pub kind: String,
    pub state: JobState,
    pub jobs: i64,
    /// Live states: seconds the oldest of them has waited for a worker: a due QUEUED job since
    /// it came due or was last held, a RUNNING or CANCELLING one since its lease expired (0 or
    /// none when nothing waits).
    pub oldest_due_seconds: Option<f64>,
    /// False when `jobs` is the estimate of a finished state with `exact_up_to` rows or more.
    pub exact: bool,
}

/// Every (kind, state) with at least one job; see the module header for what is exact and
/// what it costs.
pub async fn queue_counts(
    conn: &mut PgConnection,
    exact_up_to: i64,
) -> Result<Vec<StateCount>, sqlx::Error> {
    sqlx::query_as!(
        StateCount,
        r#"with live as (
             select kind, state, count(*) as jobs,
                    -- A running or cancelling job whose lease expired waits for a worker as
                    -- a queued one does (its own died or froze; with no worker left alive,
                    -- nothing takes it back), since its lease ran out.
                    extract(epoch from now() - min(case when state = 'queued'
                                                        then greatest(run_at, heartbeat_at)
                                                        else lease_expires_at end)
                        filter (where (state = 'queued' and run_at <= now())
                                   or (state in ('running', 'cancelling')
                                       and lease_expires_at < now())))::float8 as oldest
             from jobs
             group by kind, state
         ), bounded as (
             -- Each finished state's rows up to $1, from finished_jobs_state_id_idx alone (an
             -- index-only scan: no table page is read while the visibility map is current).
             select 'completed'::job_state as state,
                    (select count(*)
                     from (select from finished_jobs where state = 'completed' limit $1) n) as jobs
             union all
             select 'failed',
                    (select count(*)
                     from (select from finished_jobs where state = 'failed' limit $1) n)
             union all
             select 'cancelled',
                    (select count(*)
                     from (select from finished_jobs where state = 'cancelled' limit $1) n)
         ), small as (
             -- The exact split by kind of the states under $1 rows (at most $1 rows each).
             select kind, state, count(*) as jobs from finished_jobs
             where state in (select state from bounded where jobs < $1)
             group by kind, state
         ), split as (
             -- The kinds of the newest $2 rows of each state at $1 or more, to split its
             -- estimate by.
             select state, kind, count(*)::float8 / sum(count(*)) over (partition by state) as share
             from (
                 (select state, kind from finished_jobs where state = 'completed'
                  and (select jobs from bounded where state = 'completed') >= $1
                  order by id desc limit $2)
                 union all
                 (select state, kind from finished_jobs where state = 'failed'
                  and (select jobs from bounded where state = 'failed') >= $1
                  order by id desc limit $2)
                 union all
                 (select state, kind from finished_jobs where state = 'cancelled'
                  and (select jobs from bounded where state = 'cancelled') >= $1
                  order by id desc limit $2)
             ) as newest
             group by state, kind
         ), estimated as (
             select v.state,
                    c.reltuples / nullif(c.relpages, 0)
                        * (pg_relation_size(c.oid) / current_setting('block_size')::float8)
                        * v.freq as jobs
             from pg_class c
             join pg_stats st on st.schemaname = current_schema()
                 and st.tablename = 'finished_jobs'
                 and st.attname = 'state'
             cross join lateral unnest(st.most_common_vals::text::job_state[],
                                       st.most_common_freqs) as v(state, freq)
             where c.oid = 'finished_jobs'::regclass
         )
         select kind as "kind!", state as "state!: JobState", jobs as "jobs!",
                coalesce(oldest, 0) as oldest_due_seconds,
                true as "exact!"
         from live
         union all
         select kind, state, jobs, null, true from small
         union all
         select s.kind, s.state,
                round(s.share * greatest(e.jobs, b.jobs::float8))::bigint, null, false
         from split s
         join bounded b using (state)
         left join estimated e using (state)
         order by 1, 2"#,
        exact_up_to,
        SPLIT_SAMPLE,
    )
    .fetch_all(conn)
    .await
}
