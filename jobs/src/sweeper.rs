//! The sweepers (SPEC §5) and the payload of their `sweep` jobs: the scheduler writes it,
//! the sweep pool reads it. Each job names one sweeper and carries that sweeper's settings.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sweeper {
    /// S1: `provisioning` for too long → `failed` + rescue.
    ProvisionTimeout,
    /// S2: containers of removed rows, and managed containers with no row, reaped.
    Orphans,
    /// S3: live tokens of workspaces with no running container, past a grace, revoked.
    StaleTokens,
    /// S4: dead containers of `online` workspaces restarted; silent external agents → `awaiting_agent`.
    Health,
    /// S5: idle workspaces hibernated.
    Hibernation,
    /// S6: queued A2A messages past their TTL → `expired`.
    A2aTtl,
    /// S7: old rows pruned, table by table.
    Retention,
}

impl Sweeper {
    pub const ALL: [Sweeper; 7] = [
        Sweeper::ProvisionTimeout,
        Sweeper::Orphans,
        Sweeper::StaleTokens,
        Sweeper::Health,
        Sweeper::Hibernation,
        Sweeper::A2aTtl,
        Sweeper::Retention,
    ];

    /// Its name in payloads, tick keys and log events (`sweep.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Sweeper::ProvisionTimeout => "provision_timeout",
            Sweeper::Orphans => "orphans",
            Sweeper::StaleTokens => "stale_tokens",
            Sweeper::Health => "health",
            Sweeper::Hibernation => "hibernation",
            Sweeper::A2aTtl => "a2a_ttl",
            Sweeper::Retention => "retention",
        }
    }
}

impl std::fmt::Display for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How long each kind of row is kept (S7), in seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Finished jobs and their exec output.
    pub jobs_s: u64,
    /// Activity rows (poll inboxes and delivery records).
    pub activity_s: u64,
    /// Finished A2A queue rows (completed, failed, expired).
    pub a2a_s: u64,
    /// Exec audit rows.
    pub audit_s: u64,
    /// Workspace lifecycle events.
    pub events_s: u64,
    /// Rescue bundles.
    pub rescue_s: u64,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Retention { jobs_s: 7 * DAY, activity_s: 30 * DAY, a2a_s: 7 * DAY, audit_s: 90 * DAY, events_s: 30 * DAY, rescue_s: 30 * DAY }
    }
}

/// A `sweep` job's payload. Settings a sweeper does not use are absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepArgs {
    pub sweeper: Sweeper,
    /// S1: how long a workspace may stay `provisioning`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// S1: per-runtime timeouts that replace `timeout_s`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runtime_timeout_s: BTreeMap<String, u64>,
    /// S2: how long the volume of a container with no workspace row is kept (SPEC J4's
    /// RESCUE_VOLUME_GRACE). A failed workspace's instance and volume are never reaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_grace_s: Option<u64>,
    /// S3: tokens younger than this are never revoked (a restart's new token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_s: Option<u64>,
    /// S4: an external agent silent this long is `awaiting_agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_stale_s: Option<u64>,
    /// S5: idle this long → hibernated (0 or absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_s: Option<u64>,
    /// S7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// S7, as jobs fired before per-table retention carried it: finished jobs' retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_s: Option<u64>,
}

impl SweepArgs {
    pub fn new(sweeper: Sweeper) -> Self {
        SweepArgs {
            sweeper,
            timeout_s: None,
            runtime_timeout_s: BTreeMap::new(),
            volume_grace_s: None,
            grace_s: None,
            heartbeat_stale_s: None,
            idle_s: None,
            retention: None,
            retention_s: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_old_ones_still_decode() {
        let mut a = SweepArgs::new(Sweeper::ProvisionTimeout);
        a.timeout_s = Some(600);
        a.runtime_timeout_s.insert("echo".into(), 60);
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v, serde_json::json!({"sweeper": "provision_timeout", "timeout_s": 600, "runtime_timeout_s": {"echo": 60}}));
        assert_eq!(serde_json::from_value::<SweepArgs>(v).unwrap(), a);
        // What the fixed-period scheduler enqueued before.
        let old: SweepArgs = serde_json::from_str(r#"{"sweeper": "retention", "retention_s": 604800}"#).unwrap();
        assert_eq!((old.sweeper, old.retention_s), (Sweeper::Retention, Some(604800)));
        assert!(serde_json::from_str::<SweepArgs>(r#"{"sweeper": "nope"}"#).is_err());
        for s in Sweeper::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
    }
}
