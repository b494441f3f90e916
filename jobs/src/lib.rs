//! The job core: durable queues on PostgreSQL (apalis-postgres' `apalis.jobs` table),
//! with our own fetch/ack path.
//!
//! - [`enqueue`]: push jobs inside the caller's transaction, with ULIDs we generate.
//! - [`announce`]: wake-ups sent after the enqueuing transaction committed (busy paths).
//! - [`runtime`]: worker pools (one per queue), woken by LISTEN/NOTIFY with a polling
//!   and next-due fallback, batched claims (`FOR UPDATE SKIP LOCKED`) and batched acks,
//!   persisted retries with backoff, expiry, leases for orphaned jobs, graceful shutdown.
//! - [`store`]: every other statement on the job tables — claims, fenced acks, worker
//!   rows, queue statistics — so `apalis.jobs` has one owner.
//! - [`state`]: the stored states ([`JobState`], [`Outcome`]).
//! - [`status`]: the client status vocabulary (A13), reads, cancel and retry (A14).
//! - [`failures`]: what tenants read about a failure (codes and canned sentences).
//! - [`output`]: job output chunks for streaming readers, and the "finished" announcement.
//! - [`metrics`]: what the core counts (enqueued, started, outcomes, durations, stale acks).
//! - [`maintenance`]: the lease rescuer and the pruner, one file each with its test.
//! - [`sweeper`]: the sweepers and their jobs' payload (SPEC §5).
//! - [`restarts`]: restart requests, coalesced per workspace (A4, J6).
//! - [`kinds`]: the job kinds of the product, their retry policies and shutdown rules.
//!
//! What each kind does lives in `molecule-workers` (it needs the backends, which the
//! API — a user of this crate — must not link).

pub mod announce;
pub mod backoff;
pub mod enqueue;
pub mod failures;
pub mod handler;
pub mod kinds;
pub mod maintenance;
pub mod metrics;
pub mod output;
pub mod restarts;
pub mod runtime;
pub mod state;
pub mod status;
pub mod store;
pub mod sweeper;
pub mod verdicts;

pub use announce::Announcer;
pub use enqueue::{Announce, NewJob, enqueue, enqueue_many};
pub use handler::{Handler, Interrupt, JobContext, JobError, handler_fn, typed_handler};
pub use kinds::{JobKind, RetryPolicy};
pub use runtime::{LocalWakers, PoolSpec, Runtime, RuntimeConfig, ShutdownReport};
pub use state::{JobState, Outcome};
pub use status::JobStatus;
