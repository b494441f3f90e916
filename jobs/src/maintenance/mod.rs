//! Maintenance of the job tables, one service per file with its test beside it:
//!
//! - [`lease_rescuer`]: jobs held by a worker that stopped heartbeating are handed back
//!   (or, for kinds that must not run twice, end `interrupted`).
//! - [`pruner`]: finished jobs, their output, and long-silent worker rows are deleted in
//!   batches (S7 retention).

pub mod lease_rescuer;
pub mod pruner;

pub use lease_rescuer::{rescue_expired_leases, Scope};
pub use pruner::{prune_finished, Pruned};
