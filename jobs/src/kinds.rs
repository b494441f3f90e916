//! The job kinds of the product. Each kind is its own queue and its own worker pool,
//! so a flood of one kind never starves another.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    Provision,
    Stop,
    Restart,
    RescueCapture,
    Exec,
    A2aDispatch,
    Sweep,
    /// Fetches an EC2 instance's serial console (A8) into the console cache.
    Console,
}

/// How a kind retries: persisted backoff between `base` and `cap`, at most `max_attempts` runs.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    pub max_attempts: i32,
}

impl JobKind {
    pub const ALL: [JobKind; 8] =
        [Self::Provision, Self::Stop, Self::Restart, Self::RescueCapture, Self::Exec, Self::A2aDispatch, Self::Sweep, Self::Console];

    /// The queue name (apalis' `job_type`).
    pub fn queue(self) -> &'static str {
        match self {
            Self::Provision => "provision",
            Self::Stop => "stop",
            Self::Restart => "restart",
            Self::RescueCapture => "rescue_capture",
            Self::Exec => "exec",
            Self::A2aDispatch => "a2a_dispatch",
            Self::Sweep => "sweep",
            Self::Console => "console",
        }
    }

    pub fn from_queue(q: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.queue() == q)
    }

    pub fn retry_policy(self) -> RetryPolicy {
        let s = Duration::from_secs;
        match self {
            Self::Provision => RetryPolicy { base: s(5), cap: s(300), max_attempts: 5 },
            Self::Stop => RetryPolicy { base: s(5), cap: s(600), max_attempts: 10 },
            Self::Restart => RetryPolicy { base: s(5), cap: s(300), max_attempts: 5 },
            // Rescue capture has its own 45 s budget; one retry at most.
            Self::RescueCapture => RetryPolicy { base: s(10), cap: s(60), max_attempts: 2 },
            // An exec is a user waiting on a command: never silently re-run it.
            Self::Exec => RetryPolicy { base: s(1), cap: s(1), max_attempts: 1 },
            Self::A2aDispatch => RetryPolicy { base: s(2), cap: s(120), max_attempts: 8 },
            Self::Sweep => RetryPolicy { base: s(10), cap: s(60), max_attempts: 3 },
            // Someone is waiting on the page: retry soon, once.
            Self::Console => RetryPolicy { base: s(2), cap: s(10), max_attempts: 2 },
        }
    }

    /// Jobs of this kind must never run twice without someone asking: a user's command.
    /// One still running when its worker stops ends `interrupted` instead of running again.
    pub fn runs_once(self) -> bool {
        matches!(self, Self::Exec)
    }

    /// Jobs of this kind stream output that clients follow until the job finishes.
    pub fn streams_output(self) -> bool {
        matches!(self, Self::Exec)
    }

    /// Default concurrency of the kind's pool in one process.
    pub fn default_concurrency(self) -> usize {
        match self {
            Self::Provision | Self::Stop | Self::Restart => 4,
            Self::RescueCapture => 2,
            Self::Exec => 16,
            Self::A2aDispatch => 32,
            // Sweeps of one kind take turns (a lock per sweeper); different kinds run side by side.
            Self::Sweep => 4,
            Self::Console => 2,
        }
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.queue())
    }
}
