//! Maintenance of the job tables, one service per file with its test beside it:
//!
//! - [`lease_rescuer`]: jobs held by a worker that stopped heartbeating are handed back
//!   (or, for kinds that must not run twice, end `interrupted`).
//! - [`pruner`]: finished jobs, their output, and long-silent worker rows are deleted in
//!   batches (S7 retention).
//! - [`stats_refresher`]: the job table is analyzed once it has outgrown its planner
//!   statistics (plans prepared while it was empty would scan it).

pub mod lease_rescuer;
pub mod pruner;
pub mod stats_refresher;

pub use lease_rescuer::{Scope, rescue_expired_leases};
pub use pruner::{Pruned, prune_finished};
pub use stats_refresher::refresh_if_outgrown;
