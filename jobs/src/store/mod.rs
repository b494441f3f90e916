//! The runtime's statements on the job tables (`apalis.jobs`, `apalis.workers`): claims,
//! acks, worker rows, queue statistics. With `enqueue`, the client views (`status`) and
//! the maintenance services, this crate holds all of the job tables' SQL: a change of a
//! column or an index is made in `jobs/` alone.

pub mod ack;
pub mod claim;
pub mod stats;
pub mod workers;

pub use ack::{write_acks, Ack, AckWrite};
pub use claim::{claim, claim_after, next_due_after_ms, next_due_ms, ClaimCursor, Claimed};
