//! Claiming: one statement takes up to N jobs for this worker, each under a fresh lease and a
//! fence one higher than before.
//!
//! Rescue is the claim's second branch: a RUNNING or CANCELLING job whose lease expired (its
//! worker was killed, paused or cut off) is claimable by any live worker, so recovery needs no
//! separate sweeper and is bounded by `lease + poll_interval`; a killed worker's running jobs
//! are put back in the queue sooner by the probe of [`crate::liveness`], and claimed as due.
//! A live worker's heartbeat keeps its lease in the future, so a live job is never rescued.
//! The re-claim bumps the fence, so whatever the old holder still tries to write matches zero
//! rows.
//!
//! A rescue spends the attempt the lost worker was on (a cancelling job only ends, as that
//! attempt, recording nothing), except when the server itself restarted after the lease's last
//! heartbeat (`pg_postmaster_start_time()`): then no heartbeat could renew it (every session
//! died with the server, and a worker gives its jobs up after a lease without one), so an
//! outage longer than the lease would otherwise charge an attempt to every running job, and
//! fail those on their last, though their workers never went away. Such a lease is taken again
//! at the same attempt. A worker that died in the same window is let off too: at most one free
//! attempt per restart. A live server cut off from a worker for longer than the lease is not
//! told apart from a lost worker, and costs the attempt; so do a failover and a crash recovery
//! without a new postmaster, which leave the start time where it was.
//!
//! Per-kind caps (`caps`) ride in the same statement: the worker passes each capped
//! kind that has room with its free places, and the statement keeps, among the rows it locked,
//! at most that many of the kind. A capped kind without room is not passed at all. When no
//! capped kind is passed, the claim is the uncapped statement, unchanged: the hot path of short
//! uncapped jobs pays nothing for caps it does not meet.

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

/// A capped kind passed to a claim, and how many more of its jobs this claim may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub kind: String,
    pub places: i64,
}

/// The claim statement: the two candidate branches (expired leases, due queued jobs), each
/// selecting `id` plus `$columns` and locked with `skip locked`, then `$ctes` (more common table
/// expressions, or nothing), and `$picked`, the select of the ids that are taken. `$1` owner,
/// `$2` limit, `$3` lease (ms), `$4` kinds; `$ctes` may use more. A macro because the checked
/// macros take only string literals, so both claims share every word but the choice.
///
/// The update reaches the picked rows by `jobs.id = any(array(...))`, an index condition on
/// the primary key, as the statements over held jobs do (see `over_held_jobs`): as a semi-join
/// to the picked ids, a planner whose statistics took `jobs` for nearly empty (analyzed while
/// drained) walked the whole primary key for every claim (measured in the deep bench: claims
/// of 5.7-6.5 s against a backlog of 100,000; tests/queue_plan.rs shows the trap).
macro_rules! claim_statement {
    ($columns:literal, $ctes:literal, $picked:literal, $($arg:expr),* $(,)?) => {
        sqlx::query_as!(
            ClaimedJob,
            "with expired as (
                 select id" + $columns + " from jobs
                 where state in ('running', 'cancelling') and lease_expires_at < now()
                   and kind = any($4)
                 order by lease_expires_at
                 limit $2
                 for update skip locked
             ), due as (
                 select id" + $columns + " from jobs
                 where state = 'queued' and run_at <= now() and kind = any($4)
                 order by priority desc, run_at, id
                 limit $2
                 for update skip locked
             ), server as (
                 -- When the server last started: every session before it died with it.
                 select pg_postmaster_start_time() as started_at
             )" + $ctes + "
             update jobs set
                 state = case when jobs.state = 'queued' then 'running'::job_state
                              else jobs.state end,
                 -- A lease the server's restart let run out (it came after the last heartbeat:
                 -- the holder could not renew it, every session died with the server) is taken
                 -- again at the same attempt, recording nothing: no worker was lost. So is a
                 -- cancelling one: it is not run again, only ended CANCELLED as the attempt it
                 -- was on (as a cancel request ends it, `cancel`), with nothing to record.
                 attempt = case when jobs.state = 'cancelling'
                                     or (jobs.state = 'running' and jobs.heartbeat_at
                                         < (select started_at from server))
                                then jobs.attempt else jobs.attempt + 1 end,
                 -- Any other rescue records the attempt its lost worker spent (one on its last
                 -- attempt fails as that attempt, saying so: `execute`; a cancelling one only
                 -- ends).
                 errors = case when jobs.heartbeat_at < (select started_at from server)
                               then jobs.errors
                               when jobs.state = 'running' and jobs.attempt < jobs.max_attempts
                               then jobs.errors || jsonb_build_array(jsonb_build_object(
                                   'attempt', jobs.attempt,
                                   'error', 'worker lost (its lease expired)',
                                   'at', now(), 'retry_at', now()))
                               else jobs.errors end,
                 fence = jobs.fence + 1,
                 lease_owner = $1,
                 lease_expires_at = now() + $3 * interval '1 millisecond',
                 heartbeat_at = now(),
                 started_at = coalesce(jobs.started_at, now())
             where jobs.id = any(array(" + $picked + "))
             returning id, kind, args, attempt, max_attempts, fence, checkpoint, processed, total,
                       cancel_requested, jobs.id in (select id from expired) as \"rescued!\"",
            $($arg),*
        )
    };
}

/// Claims up to `limit` jobs of `kinds` for `owner`: expired leases first (they are late
/// already), then due queued jobs by priority. Rows locked by another claimer are skipped, never
/// waited on. Only kinds this worker can run are claimed, so during a rolling deploy an older
/// worker leaves a new kind's jobs to the workers that know it instead of failing them.
///
/// `rooms` are the capped kinds among `kinds`: of each, at most its `places` jobs are taken
/// (the first ones in claim order); the other candidates of the kind stay where they are.
pub async fn claim(
    conn: &mut PgConnection,
    owner: &str,
    limit: i64,
    lease: Duration,
    kinds: &[String],
    rooms: &[Room],
) -> Result<Vec<ClaimedJob>, sqlx::Error> {
    let lease_ms = lease.as_millis() as f64;
    if rooms.is_empty() {
        return claim_statement!(
            "",
            "",
            "select id from (select id from expired union all select id from due) c limit $2",
            owner,
            limit,
            lease_ms,
            kinds,
        )
        .fetch_all(conn)
        .await;
    }
    let (capped, places): (Vec<String>, Vec<i64>) = rooms
        .iter()
        .map(|room| (room.kind.clone(), room.places))
        .unzip();
    // Uncapped candidates pass as they are; each capped kind keeps its first `places`
    // candidates in claim order (a lateral limit per capped kind, no sort). The uncapped come
    // first when `$2` cuts (only when expired leases and due jobs together exceed it).
    claim_statement!(
        ", kind",
        ", candidates as (
             select id, kind from expired union all select id, kind from due
         ), picked as (
             select id from (
                 select id from candidates where kind <> all($5)
                 union all
                 select capped.id
                 from unnest($5::text[], $6::bigint[]) as room(kind, places)
                 cross join lateral (
                     select id from candidates where candidates.kind = room.kind
                     limit room.places
                 ) capped
             ) p
             limit $2
         )",
        "select id from picked",
        owner,
        limit,
        lease_ms,
        kinds,
        &capped,
        &places,
    )
    .fetch_all(conn)
    .await
}
