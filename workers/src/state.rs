//! A job's state, as the `job_state` enum of `migrations/0004_jobs.sql` stores it. The queue's
//! statements write and compare states in their own SQL; Rust code reads, binds and matches
//! this enum, so a misspelt state is a compile error rather than a row that matches nothing.

use serde::{Deserialize, Serialize};

/// Where a job is in its life: QUEUED → RUNNING → COMPLETED, FAILED or CANCELLED (back to
/// QUEUED for a retry, a snooze or a release), and CANCELLING between a cancel request and the
/// running job's stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type, Serialize, Deserialize)]
#[sqlx(type_name = "job_state", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker (from `run_at` on).
    Queued,
    /// Held by a worker under a lease.
    Running,
    /// Running, with a cancel requested: it ends CANCELLED at its next checkpoint.
    Cancelling,
    Completed,
    /// Out of attempts, or failed fatally.
    Failed,
    Cancelled,
}

impl JobState {
    /// Every state, in the order of the `job_state` type.
    pub const ALL: [Self; 6] = [
        Self::Queued,
        Self::Running,
        Self::Cancelling,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The name as stored (`queued`, `running`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Cancelling => "cancelling",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The name as the HTTP API shows it (`QUEUED`, `RUNNING`, …).
    pub fn as_api_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Running => "RUNNING",
            Self::Cancelling => "CANCELLING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// True while the job may still run: queued, running or cancelling.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Queued | Self::Running | Self::Cancelling)
    }
}

/// A name that is not a job state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(pub String);

// Shown and parsed as the stored (lowercase) name.
crate::impl_display_from_str!(JobState, UnknownState, UnknownState);

/// `Display` as `as_str()` and `FromStr` as the one of `ALL` whose `as_str()` the text is (else
/// `Err($unknown(text))`), for a fieldless enum with both: each value's name is spelt once, in
/// `as_str`, for both directions.
#[macro_export]
macro_rules! impl_display_from_str {
    ($enum:ty, $error:ty, $unknown:expr) => {
        impl ::std::fmt::Display for $enum {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                // `pad`, not `write_str`: a width such as `{:<8}` in a table applies.
                f.pad(self.as_str())
            }
        }

        impl ::std::str::FromStr for $enum {
            type Err = $error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|value| value.as_str() == s)
                    .ok_or_else(|| $unknown(s.to_owned()))
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse(), Ok(state));
            assert_eq!(state.as_api_str(), state.as_str().to_uppercase());
            let json = serde_json::to_value(state).expect("serializes");
            assert_eq!(json, serde_json::json!(state.as_str()));
        }
        assert!("QUEUED".parse::<JobState>().is_err());
    }

    #[test]
    fn a_width_pads_the_name() {
        assert_eq!(format!("{:<8}|", JobState::Queued), "queued  |");
    }
}
