//! The states of a row of `apalis.jobs`, as stored. apalis-postgres' vocabulary is kept
//! (its tools read our rows); [`Outcome`] says how a terminal job ended. The client's
//! view of both is [`crate::status::JobStatus`].

use serde::{Deserialize, Serialize};

/// `apalis.jobs.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text")]
pub enum JobState {
    /// Waiting for its `run_at`.
    Pending,
    /// apalis' own fetcher's claim; ours goes straight to Running. Read as running.
    Queued,
    /// Claimed by a worker (`lock_by`) under a fence.
    Running,
    /// Succeeded.
    Done,
    /// The last attempt failed; it runs again at `run_at` (shown `retrying`).
    Failed,
    /// Terminal without success: `outcome` says why.
    Killed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Queued => "Queued",
            Self::Running => "Running",
            Self::Done => "Done",
            Self::Failed => "Failed",
            Self::Killed => "Killed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Killed)
    }
}

/// `apalis.jobs.outcome`: how a terminal job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Succeeded,
    /// Out of attempts.
    Dead,
    /// Failed permanently: its handler said another attempt would fail the same way.
    Failed,
    /// Past its `expires_at` before it could run.
    Expired,
    Cancelled,
    /// Running when its worker stopped, and of a kind that must not run twice.
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }
}
