//! # settle-workers
//!
//! settle's durable job queue on Postgres: jobs are rows, claimed with `FOR UPDATE SKIP
//! LOCKED`, held under a lease a heartbeat extends, and fenced by a counter bumped at every
//! claim, so a worker that lost its lease writes nothing. Long jobs commit their own writes
//! with their checkpoint in one transaction and resume from it on any worker. Live jobs are
//! rows of `jobs`; the statement that ends a job moves its row to `finished_jobs`, and
//! `all_jobs` reads both.
//!
//! # Layout
//!
//! - [`enqueue`](mod@enqueue): insert jobs inside the caller's transaction, singly or in bulk.
//! - [`claim`]: the claim statement, including the rescue of expired leases and the caps.
//! - `caps`: per-kind caps: the free places of each capped kind, reserved for a claim.
//! - [`lease`]: heartbeat, fenced resume read, release on shutdown.
//! - [`liveness`]: each worker's advisory lock, and the probe that expires a dead worker's
//!   leases at once instead of at lease expiry.
//! - [`finish`]: complete, fail with backoff, snooze, cancel — all fenced, each moving a job
//!   that ends to `finished_jobs`.
//! - [`cancel`]: cancel requests (flag + NOTIFY), and the flag read back.
//! - [`retry`](mod@retry): a FAILED or CANCELLED job back to QUEUED, starting over.
//! - [`retention`]: pruning finished jobs under an advisory lock.
//! - [`job`]: the body's handle ([`JobContext`], [`Batch`]) and its [`Outcome`].
//! - [`registry`]: job kinds → bodies.
//! - [`runtime`]: the [`Worker`], the state its tasks share, and shutdown step by step.
//! - `services`: the tasks beside the jobs, one file each: `claimer` (claim loops),
//!   `listener` (LISTEN/NOTIFY), `heartbeat`, `completer` (batched completions), `pruner`,
//!   `vacuumer` (keeps the jobs table compact), `rescuer` (liveness lock and probe),
//!   `sweeper` (the jobs of a claim whose reply was lost).
//! - `execute`: one claimed job's attempt, from its body to its recorded ending.
//! - `db`: the runtime's statement helpers: on a pooled connection, retried until a deadline.
//! - [`read`]: job records for the API, and which jobs are still live.
//! - [`stats`]: the queue at a glance (jobs by kind and state, oldest wait) for metrics.
//! - [`metrics`]: the queue's counters (jobs finished, their run time, rescues).
//! - [`state`]: [`JobState`], the `job_state` SQL type in Rust.
//! - [`settings`], [`error`].

/// A checked statement (`sqlx::query_scalar!` or `sqlx::query_as!`) over many held jobs
/// (`$1` ids, `$2` their fences) that starts with `with held as (…)`: the rows still held under
/// that fence, locked in id order. Every such statement (heartbeat, release, batched completion)
/// locks them the same way, so two of them never deadlock. A macro because the checked macros
/// take only string literals (joined with `+`), not a constant.
///
/// Each held id is looked up by primary key, in id order (a lateral subquery that locks cannot
/// be flattened into a join): as a join, the planner scanned the partial index of running jobs
/// instead whenever its statistics said few jobs run, and after a drain that index holds an
/// entry for every job that ran since the last vacuum (measured: 22-50 ms per heartbeat of 3
/// jobs with 300,000 such entries, against 0.2 ms by primary key). The state is compared as
/// text for the same reason: as an enum it implies that index's predicate, and on the runtime's
/// sessions (no bitmap scans, see [`runtime::control_options`]) the planner walked that index
/// whole for each id (100-640 ms per heartbeat in the deep bench). The statement's own step
/// reaches them the same way, by `jobs.id = any(array(select id from held))`, an index
/// condition on the primary key: joined to `held`, a planner that took `jobs` for nearly empty
/// scanned the whole table once per held job (measured in the deep bench: heartbeats of 4-11 s,
/// and leases lost to them). Every statement that reaches one job by its id compares the state
/// as text too (a job's checkpoint and progress, `lease::reload`, `finish::lock_for_completion`,
/// the cancels), so the primary key serves it, not a walk of the held jobs' or the queued jobs'
/// partial index (tests/queue_plan.rs).
///
/// `lock = " skip locked";` first leaves out the jobs another transaction holds locked, instead
/// of waiting for them (the heartbeat: one job's long lock must not hold up every lease).
macro_rules! over_held_jobs {
    ($macro:ident!($($record:path;)? $(lock = $lock:literal;)? $rest:literal $(+ $more:literal)*, $($arg:expr),* $(,)?)) => {
        sqlx::$macro!(
            $($record,)?
            "with held as (
                 select j.*
                 from (select * from unnest($1::bigint[], $2::bigint[]) as h(id, fence)
                       order by id) as h
                 cross join lateral (
                     select jobs.id, jobs.cancel_requested, jobs.attempt, jobs.max_attempts
                     from jobs
                     where jobs.id = h.id and jobs.fence = h.fence
                       and jobs.state::text in ('running', 'cancelling')
                     for update" $(+ $lock)? + "
                 ) as j
             )" + $rest $(+ $more)*,
            $($arg),*
        )
    };
}

pub mod cancel;
mod caps;
pub mod claim;
mod db;
pub mod enqueue;
pub mod error;
mod execute;
pub mod finish;
pub mod job;
pub mod lease;
pub mod liveness;
pub mod metrics;
pub mod read;
pub mod registry;
pub mod retention;
pub mod retry;
pub mod runtime;
mod services;
pub mod settings;
pub mod state;
pub mod stats;

pub use cancel::{CancelOutcome, request_cancel};
pub use enqueue::{NewJob, enqueue, enqueue_many};
pub use error::JobError;
pub use job::{Batch, JobContext, JobResult, Outcome};
pub use registry::Registry;
pub use retry::{RetryOutcome, retry};
pub use runtime::Worker;
pub use settings::WorkerSettings;
pub use state::JobState;
