//! Holding jobs: the heartbeat that extends every held lease in one statement, and the fenced
//! re-read a job resumes from after a transient error. Handing a job back on shutdown is an
//! ending, with the others ([`crate::finish::release`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgConnection;

/// When this worker last knew a held job's lease to be extended: the moment before the
/// statement that extended it was sent (the claim, a heartbeat that found the row unlocked, a
/// checkpoint's fenced commit, as of its transaction's start, whose `now()` it used). The lease
/// runs out no sooner than a lease after it, so a worker cut off from the server drops the job
/// only then, and never one that a checkpoint renewed since the last beat that got through
/// (dropped early, its lease then ran out with a heartbeat the server's restart came before,
/// and its attempt was spent as a lost worker's).
#[derive(Debug)]
pub(crate) struct LeaseClock(Mutex<Instant>);

impl LeaseClock {
    pub fn new(at: Instant) -> Self {
        Self(Mutex::new(at))
    }

    /// Notes an extension sent at `at` (a later one already noted stays).
    pub fn renewed(&self, at: Instant) {
        let mut last = self.0.lock().expect("lease clock");
        *last = (*last).max(at);
    }

    /// Whether a whole `lease` has passed since the last extension noted.
    pub fn ran_out(&self, lease: Duration) -> bool {
        self.0.lock().expect("lease clock").elapsed() >= lease
    }
}

/// A held job as the heartbeat found it.
#[derive(Debug, sqlx::FromRow)]
pub struct Beat {
    pub id: i64,
    /// A cancel was requested: the heartbeat is the fallback when the NOTIFY was missed.
    pub cancel_requested: bool,
    /// Still held, but locked by another transaction (its own long write, an ending, a claim
    /// about to rescue it): its lease was not extended this time.
    pub busy: bool,
}

/// Extends the lease of every `(id, fence)` still held; a job missing from the answer was lost
/// (reclaimed after this worker stalled) and must be dropped. A job whose row another
/// transaction holds locked is not waited for (one job's long lock would hold up every lease):
/// it comes back `busy`, its lease as it was.
pub async fn heartbeat(
    conn: &mut PgConnection,
    held: &[(i64, i64)],
    lease: Duration,
) -> Result<Vec<Beat>, sqlx::Error> {
    let (ids, fences): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    over_held_jobs!(query_as!(
        Beat;
        lock = " skip locked";
        ", beat as (
             update jobs
             set lease_expires_at = now() + $3 * interval '1 millisecond', heartbeat_at = now()
             where jobs.id = any(array(select id from held))
             returning jobs.id, jobs.cancel_requested
         )
         select id as \"id!\", cancel_requested as \"cancel_requested!\", false as \"busy!\"
         from beat
         union all
         select jobs.id, false, true from jobs
         where jobs.id = any(array(select id from unnest($1::bigint[]) as h(id)
                                   where id <> all(array(select id from held))))
           and jobs.fence = ($2::bigint[])[array_position($1::bigint[], jobs.id)]
           and jobs.state::text in ('running', 'cancelling')",
        &ids,
        &fences,
        lease.as_millis() as f64,
    ))
    .fetch_all(conn)
    .await
}

/// The resume point of a held job, read under its fence.
#[derive(Debug, sqlx::FromRow)]
pub struct Resume {
    pub checkpoint: Option<Value>,
    pub processed: i64,
    pub total: Option<i64>,
    pub cancel_requested: bool,
}

/// Re-reads the last committed checkpoint; `None` when the fence no longer matches.
pub async fn reload(
    conn: &mut PgConnection,
    id: i64,
    fence: i64,
) -> Result<Option<Resume>, sqlx::Error> {
    sqlx::query_as!(
        Resume,
        "select checkpoint, processed, total, cancel_requested from jobs
         where id = $1 and fence = $2 and state::text in ('running', 'cancelling')",
        id,
        fence,
    )
    .fetch_optional(conn)
    .await
}

/// The jobs the database shows `owner` holding (RUNNING or CANCELLING under its lease) other
/// than the `(id, fence)` pairs of `held`, with their fences: claimed by a claim whose reply
/// never reached the worker (or an ending it gave up recording).
pub async fn unheld(
    conn: &mut PgConnection,
    owner: &str,
    held: &[(i64, i64)],
) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    let (ids, fences): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
    let rows = sqlx::query!(
        "select id, fence from jobs
         where state in ('running', 'cancelling') and lease_owner = $1
           and (id, fence) not in (select * from unnest($2::bigint[], $3::bigint[]))",
        owner,
        &ids,
        &fences,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|row| (row.id, row.fence)).collect())
}
