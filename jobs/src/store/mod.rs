//! The runtime's statements on the job tables (`apalis.jobs`, `apalis.workers`): claims,
//! acks, worker rows, queue statistics. With `enqueue`, the client views (`status`) and
//! the maintenance services, this crate holds all of the job tables' SQL: a change of a
//! column or an index is made in `jobs/` alone.

pub mod ack;
pub mod claim;
pub mod stats;
pub mod workers;

pub use ack::{Ack, AckWrite, write_acks};
pub use claim::{CLAIM_SHARDS, ClaimCursor, Claimed, Shard, claim, claim_after, claim_each_shard, next_due_after_ms, next_due_ms};

/// How each read of the job table in an EXPLAIN (FORMAT JSON) plan is done ("<node type>
/// <index or ->"), the update itself aside: the plan tests of claims and acks.
#[cfg(test)]
pub(crate) fn table_reads(plan: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    reads(plan, false, &mut out);
    out
}

/// [`table_reads`] of the plan nodes that ran (EXPLAIN ANALYZE: `Actual Loops` > 0).
#[cfg(test)]
pub(crate) fn executed_reads(plan: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    reads(plan, true, &mut out);
    out
}

#[cfg(test)]
fn reads(plan: &serde_json::Value, executed_only: bool, out: &mut Vec<String>) {
    use serde_json::Value;
    if executed_only && plan.get("Actual Loops").and_then(Value::as_u64) == Some(0) {
        return;
    }
    if plan.get("Relation Name").and_then(Value::as_str) == Some("jobs") && plan["Node Type"] != "ModifyTable" {
        out.push(format!(
            "{} {}",
            plan["Node Type"].as_str().unwrap_or("?"),
            plan.get("Index Name").and_then(Value::as_str).unwrap_or("-")
        ));
    }
    for p in plan.get("Plans").and_then(Value::as_array).into_iter().flatten() {
        reads(p, executed_only, out);
    }
}
