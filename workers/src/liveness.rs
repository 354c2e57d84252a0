//! Liveness: how a worker proves it is alive to the others, so a killed worker's jobs move on
//! within about a second instead of waiting out their lease.
//!
//! Each worker holds, on a connection of its own, a session-level advisory lock keyed by its
//! `lease_owner` (the pair [`LOCK_CLASS`], `hashtext(owner)`). Postgres releases it the instant
//! that session ends, which is the instant the process dies (SIGKILL, OOM, crash: the server
//! sees the socket close). The other workers probe the owners of live leases against
//! `pg_locks`; an owner seen without its lock for a whole grace period is dead: its running
//! jobs go back to the queue (the next claim takes them under a fresh fence) and its
//! cancelling ones end CANCELLED.
//!
//! Only owners whose name ends in [`LOCKED_OWNER_SUFFIX`] are probed: they hold a lock. A
//! worker of an older release (no lock) keeps being rescued by its lease alone, so a rolling
//! deploy never has its live jobs taken. A hash collision of two owners can only make a dead
//! owner look alive (its jobs then wait out the lease), never the reverse.

use sqlx::PgConnection;
use sqlx::postgres::PgListener;

/// The `lease_owner` suffix of a worker that holds a liveness lock.
pub const LOCKED_OWNER_SUFFIX: &str = "+lock";

/// First half of every liveness lock's key ("setl"); `pg_locks` shows it as `classid`, the
/// owner's hash as `objid`, with `objsubid = 2` (the two-integer form). The statements below
/// repeat it as a literal, since the checked macros take no constants.
pub const LOCK_CLASS: i32 = 0x7365_746c;

/// Takes `owner`'s liveness lock on the holder's own session. False when another session holds
/// it: this worker's previous session, not yet ended by the server (a cut network), or another
/// owner whose name hashes alike.
pub async fn lock(holder: &mut PgListener, owner: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select pg_try_advisory_lock(1936028780, hashtext($1)) as "locked!""#,
        owner
    )
    .fetch_one(holder)
    .await
}

/// What one probe found.
#[derive(Debug, sqlx::FromRow)]
pub struct Probe {
    /// Owners of live leases, other than the prober, whose lock no session holds now (those
    /// whose jobs this probe took left out).
    pub unlocked: Vec<String>,
    /// Jobs this probe took from dead owners.
    pub expired: i64,
    /// Of those, the running ones it put back in the queue.
    pub requeued: i64,
    /// Some other CANCELLING job's lease had expired (its holder frozen or cut off), for
    /// [`crate::cancel::end_expired_cancels`].
    pub cancels_expired: bool,
}

/// Finds the owners (other than `me`) of live leases whose liveness lock is free, and takes
/// the jobs of those among `dead` that are still without it from them, waking the claimers if
/// any was (one NOTIFY): a running job goes back to the queue, its attempt spent (the next
/// claim gives it a fresh fence; on its last attempt, that claim fails it as worker lost), and
/// a cancelling one's lease expires, for [`crate::cancel::end_expired_cancels`]. The server's
/// restart frees every lock at once: a running job whose last heartbeat it came after goes back
/// with its attempt given back, as the claim takes a lease the restart let run out (see
/// `crate::claim`).
///
/// The leases are expired through `jobs.id = any(array(...))` and a state compared as text, as
/// the statements over held jobs reach theirs (see `over_held_jobs`): as a join to `unlocked`,
/// a planner that took `jobs` for nearly empty walked the whole partial index of held jobs on
/// every probe, dead entries included (tests/queue_plan.rs).
pub async fn probe(
    conn: &mut PgConnection,
    me: &str,
    dead: &[String],
) -> Result<Probe, sqlx::Error> {
    sqlx::query_as!(
        Probe,
        r#"with unlocked as (
               select jobs.id, jobs.lease_owner from jobs
               where jobs.state in ('running', 'cancelling') and jobs.lease_expires_at > now()
                 and jobs.lease_owner like '%' || $3 and jobs.lease_owner <> $1
                 and hashtext(jobs.lease_owner)::oid not in (
                     select objid from pg_locks
                     where locktype = 'advisory' and granted and objsubid = 2
                       and classid = 1936028780
                       and database = (select oid from pg_database
                                       where datname = current_database()))
           ), expired as (
               -- A running job goes back to the queue (nobody runs it; shown so at once, and
               -- taken by the next claim with room for its kind, ahead of later jobs: its
               -- run_at is theirs or older); a cancelling one is ended by the caller.
               update jobs set
                   state = case when jobs.state = 'running' then 'queued'::job_state
                                else jobs.state end,
                   lease_owner = case when jobs.state = 'running' then null
                                      else jobs.lease_owner end,
                   lease_expires_at = case when jobs.state = 'running' then null else now() end,
                   -- An owner whose lock the server's restart took after its last heartbeat
                   -- may be alive (its lock not yet taken again): as the claim's rescue of a
                   -- lease the restart let run out, the attempt is given back (the next claim
                   -- counts it again), with nothing recorded.
                   attempt = case when jobs.state = 'running' and jobs.heartbeat_at < (
                                           select pg_postmaster_start_time())
                                  then greatest(jobs.attempt - 1, 0) else jobs.attempt end,
                   -- Otherwise the attempt spent, recorded as the claim's rescue records it.
                   errors = case when jobs.heartbeat_at < (select pg_postmaster_start_time())
                                 then jobs.errors
                                 when jobs.state = 'running' and jobs.attempt < jobs.max_attempts
                                 then jobs.errors || jsonb_build_array(jsonb_build_object(
                                     'attempt', jobs.attempt,
                                     'error', 'worker lost (its session ended)',
                                     'at', now(), 'retry_at', now()))
                                 else jobs.errors end
               where jobs.id = any(array(select id from unlocked where lease_owner = any($2)))
                 and jobs.lease_owner = any($2)
                 and jobs.state::text in ('running', 'cancelling')
               -- Postgres delivers the same notification once per transaction.
               returning jobs.id, jobs.state, pg_notify('settle_jobs', '')
           )
           select array(select distinct lease_owner from unlocked
                        where lease_owner <> all($2)) as "unlocked!",
                  (select count(*) from expired) as "expired!",
                  (select count(*) from expired where state = 'queued') as "requeued!",
                  exists (select from jobs
                          where state = 'cancelling' and lease_expires_at < now())
                      as "cancels_expired!""#,
        me,
        dead,
        LOCKED_OWNER_SUFFIX,
    )
    .fetch_one(conn)
    .await
}
