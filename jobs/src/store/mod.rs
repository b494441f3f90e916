//! Every statement on the job tables (`apalis.jobs`, `apalis.workers`) outside enqueue
//! and the client views (`status`): the runtime's claims and acks, worker rows, queue
//! statistics. One owner, so a change of a column or an index is made in one place.

pub mod ack;
pub mod claim;
pub mod stats;
pub mod workers;

pub use ack::{write_acks, Ack, AckWrite};
pub use claim::{claim, next_due_ms, Claimed};
