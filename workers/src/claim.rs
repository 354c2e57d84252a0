//! Claiming: one statement takes up to N jobs for this worker, each under a fresh lease and a
//! fence one higher than before.
//!
//! Rescue is the claim's second branch: a RUNNING or CANCELLING job whose lease expired (its
//! worker was killed, paused or cut off) is claimable by any live worker, so recovery needs no
//! separate sweeper and is bounded by `lease + poll_interval`; a killed worker's leases are
//! expired sooner by the probe of [`crate::liveness`]. A live worker's heartbeat keeps its
//! lease in the future, so a live job is never rescued. The re-claim bumps the fence, so whatever
//! the old holder still tries to write matches zero rows.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgConnection;

/// A job this worker now holds.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedJob {
    pub id: i64,
    pub kind: String,
    pub args: Value,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub max_attempts: i32,
    /// The claim's fencing token: every later write of this holder names it.
    pub fence: i64,
    pub checkpoint: Option<Value>,
    pub processed: i64,
    pub total: Option<i64>,
    /// Set when the job was rescued while a cancel was pending.
    pub cancel_requested: bool,
    /// Taken over from an expired lease (the claim's rescue branch), not from the queue.
    pub rescued: bool,
}

/// Claims up to `limit` jobs of `kinds` for `owner`: expired leases first (they are late
/// already), then due queued jobs by priority. Rows locked by another claimer are skipped, never
/// waited on. Only kinds this worker can run are claimed, so during a rolling deploy an older
/// worker leaves a new kind's jobs to the workers that know it instead of failing them.
pub async fn claim(
    conn: &mut PgConnection,
    owner: &str,
    limit: i64,
    lease: Duration,
    kinds: &[String],
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    sqlx::query_as!(
        ClaimedJob,
        "with expired as (
             select id from jobs
             where state in ('running', 'cancelling') and lease_expires_at < now()
               and kind = any($4)
             order by lease_expires_at
             limit $2
             for update skip locked
         ), due as (
             select id from jobs
             where state = 'queued' and run_at <= now() and kind = any($4)
             order by priority desc, run_at, id
             limit $2
             for update skip locked
         )
         update jobs set
             state = case when jobs.state = 'queued' then 'running'::job_state else jobs.state end,
             attempt = jobs.attempt + 1,
             fence = jobs.fence + 1,
             lease_owner = $1,
             lease_expires_at = now() + $3 * interval '1 millisecond',
             heartbeat_at = now(),
             started_at = coalesce(jobs.started_at, now())
         where jobs.id in (
             select id from (select id from expired union all select id from due) c limit $2
         )
         returning id, kind, args, attempt, max_attempts, fence, checkpoint, processed, total,
                   cancel_requested, jobs.id in (select id from expired) as \"rescued!\"",
        owner,
        limit,
        lease.as_millis() as f64,
        kinds,
    )
    .fetch_all(conn)
    .await
}
