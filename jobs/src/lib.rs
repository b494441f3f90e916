//! The job core: durable queues on PostgreSQL (apalis-postgres' `apalis.jobs` table),
//! with our own fetch/ack path.
//!
//! - [`enqueue`]: push jobs inside the caller's transaction, with ULIDs we generate.
//! - [`runtime`]: worker pools (one per queue), woken by LISTEN/NOTIFY with a polling
//!   and next-due fallback, batched claims (`FOR UPDATE SKIP LOCKED`) and batched acks,
//!   persisted retries with backoff, expiry, leases for orphaned jobs, graceful shutdown.
//! - [`status`]: the client status vocabulary (A13), reads, cancel and retry (A14).
//! - [`maintenance`]: orphan recovery and retention pruning.
//! - [`kinds`]: the job kinds of the product and their retry policies.
//!
//! What each kind does lives in `molecule-workers` (it needs the backends, which the
//! API — a user of this crate — must not link).

pub mod backoff;
pub mod enqueue;
pub mod handler;
pub mod kinds;
pub mod maintenance;
pub mod runtime;
pub mod status;
pub mod verdicts;

pub use enqueue::{enqueue, enqueue_many, NewJob};
pub use handler::{handler_fn, typed_handler, Handler, JobContext, JobError};
pub use kinds::{JobKind, RetryPolicy};
pub use runtime::{PoolSpec, Runtime, RuntimeConfig, ShutdownReport};
pub use status::JobStatus;
