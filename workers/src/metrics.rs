//! The queue's counters, recorded where they happen through the `metrics` facade: a job's end
//! (by kind and outcome, with its run time) where its ending is written, and a rescue where the
//! claim takes over an expired lease. The process embedding the queue picks the recorder and
//! exports it; without one these are no-ops.

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

use crate::state::JobState;

/// Jobs that reached COMPLETED, FAILED or CANCELLED, by `kind` and `outcome` (the state).
pub const JOBS_FINISHED: &str = "settle_jobs_finished_total";
/// From a job's first claim to its end, by `kind`: backoff between attempts included.
pub const JOB_DURATION: &str = "settle_job_duration_seconds";
/// Jobs taken from a worker: claimed after its lease expired (paused, cut off), or put back in
/// the queue because its liveness lock was freed (killed).
pub const JOB_RESCUES: &str = "settle_job_rescues_total";

/// A job's end as its fenced ending statement returned it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Ended {
    pub kind: String,
    /// The job's state after the statement: a retry or a snooze leaves it QUEUED.
    pub state: JobState,
    /// `finished_at - started_at`, for a job that ended.
    pub seconds: Option<f64>,
}

impl Ended {
    /// Counts the job as finished if the statement ended it (a retry or snooze did not).
    /// Call once its transaction has committed.
    pub fn record(&self) {
        if self.state.is_live() {
            return;
        }
        let kind = self.kind.clone();
        counter!(JOBS_FINISHED, "kind" => kind.clone(), "outcome" => self.state.as_str())
            .increment(1);
        if let Some(seconds) = self.seconds {
            histogram!(JOB_DURATION, "kind" => kind).record(seconds.max(0.0));
        }
    }
}

/// Counts `n` rescued jobs; 0 makes the series exist before any rescue (a worker starting).
pub(crate) fn rescued(n: usize) {
    counter!(JOB_RESCUES).increment(n as u64);
}

/// HELP lines for the queue's metrics; call once the recorder is installed.
pub fn describe() {
    describe_counter!(
        JOBS_FINISHED,
        "Jobs that reached completed, failed or cancelled, by kind and outcome"
    );
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "From a job's first claim to its end, by kind"
    );
    describe_counter!(
        JOB_RESCUES,
        "Jobs taken from a worker that died or whose lease expired"
    );
}
