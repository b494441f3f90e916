//! What a workspace's instance may do (issue 12): tenants run their own commands in
//! workspaces (tier ≥ 3), so each is a hostile neighbour. Every instance starts with all
//! capabilities dropped and only its runtime's few added back, `no-new-privileges`, and
//! memory, CPU and process limits by tier; the reference runtime runs as a non-root user.
//! Commands exec'd into an instance run inside the same limits and capability set.

/// Resource limits of one instance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids: i64,
}

/// Limits for tiers 1 to 4.
#[derive(Clone, Debug, PartialEq)]
pub struct TierLimits(pub [Limits; 4]);

impl Default for TierLimits {
    /// Tier 1 256 MiB / 0.25 CPU / 128 processes, doubling per tier up to 2 GiB / 2 CPUs /
    /// 1024 processes.
    fn default() -> Self {
        let l = |memory_mb, cpus, pids| Limits { memory_mb, cpus, pids };
        TierLimits([l(256, 0.25, 128), l(512, 0.5, 256), l(1024, 1.0, 512), l(2048, 2.0, 1024)])
    }
}

impl TierLimits {
    pub fn of(&self, tier: i16) -> Limits {
        self.0[(tier.clamp(1, 4) - 1) as usize]
    }

    /// Overrides in `TIER=MEMORY_MB/CPUS/PIDS` form, comma-separated, e.g.
    /// `3=4096/2/2048,4=8192/4/4096`.
    pub fn parse(spec: &str) -> Result<TierLimits, String> {
        let mut out = TierLimits::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = || format!("{item:?}: expected TIER=MEMORY_MB/CPUS/PIDS, e.g. 3=2048/1/512");
            let (tier, rest) = item.split_once('=').ok_or_else(bad)?;
            let tier: usize = tier.trim().parse().ok().filter(|t| (1..=4).contains(t)).ok_or_else(bad)?;
            let parts: Vec<&str> = rest.split('/').map(str::trim).collect();
            let [m, c, p] = parts[..] else { return Err(bad()) };
            let limits = Limits {
                memory_mb: m.parse().ok().filter(|m| *m >= 16).ok_or_else(bad)?,
                cpus: c.parse().ok().filter(|c: &f64| *c > 0.0 && *c <= 256.0).ok_or_else(bad)?,
                pids: p.parse().ok().filter(|p| *p >= 16).ok_or_else(bad)?,
            };
            out.0[tier - 1] = limits;
        }
        Ok(out)
    }
}

/// What a runtime's image needs beyond nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeProfile {
    /// Capabilities added back after dropping all of them.
    pub cap_add: &'static [&'static str],
    /// The user (`uid:gid`) the instance runs as; None: the image's own.
    pub user: Option<(u32, u32)>,
}

/// Capabilities third-party runtime images commonly need to install packages and switch
/// users at start (file ownership, setuid for their entrypoints). Never NET_RAW (sniffing
/// loopback traffic under host networking), NET_ADMIN, SYS_ADMIN, SYS_PTRACE or MKNOD.
pub const IMAGE_DEFAULT_CAPS: &[&str] = &["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"];

/// The non-root user the reference image runs as.
pub const ECHO_USER: (u32, u32) = (65532, 65532);

/// Per runtime: `echo` (the reference agent, built here) needs no capability at all and
/// runs as a non-root user; the others are third-party images whose entrypoints may
/// expect root and a few file-ownership capabilities.
pub fn profile(runtime: &str) -> RuntimeProfile {
    match runtime {
        "echo" => RuntimeProfile { cap_add: &[], user: Some(ECHO_USER) },
        _ => RuntimeProfile { cap_add: IMAGE_DEFAULT_CAPS, user: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_limits_parse_and_bad_ones_are_named() {
        let l = TierLimits::parse("3=4096/2/2048").unwrap();
        assert_eq!(l.of(3), Limits { memory_mb: 4096, cpus: 2.0, pids: 2048 });
        assert_eq!(l.of(1), TierLimits::default().of(1));
        assert_eq!(l.of(9), l.of(4), "tiers clamp");
        for bad in ["5=1/1/1", "3=2048/1", "3=x/1/512", "3=2048/0/512", "3=8/1/512", "3"] {
            assert!(TierLimits::parse(bad).unwrap_err().contains("TIER=MEMORY_MB/CPUS/PIDS"), "{bad}");
        }
    }

    #[test]
    fn no_runtime_gets_a_dangerous_capability() {
        for r in molecule_domain::runtimes::KNOWN {
            for cap in profile(r).cap_add {
                assert!(!["NET_RAW", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_MODULE", "MKNOD"].contains(cap), "{r}: {cap}");
            }
        }
        assert_eq!(profile("echo").cap_add, &[] as &[&str]);
    }
}
