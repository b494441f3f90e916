//! Persisted retry delay: exponential from `base`, capped at `cap`, plus up to 50 %
//! jitter on top. The delay never falls below `base` and, below the cap, every retry
//! waits longer than the one before (attempt n waits in [d, 1.5d], n+1 in [2d, 3d]).

use crate::kinds::RetryPolicy;
use std::time::Duration;

/// Delay before the attempt after `attempt` (1-based: the attempt that just failed).
pub fn retry_delay(policy: &RetryPolicy, attempt: i32) -> Duration {
    let exp = attempt.saturating_sub(1).clamp(0, 30) as u32;
    let base_ms = policy.base.as_millis() as u64;
    let cap_ms = policy.cap.as_millis().max(1) as u64;
    let d = base_ms.saturating_mul(1u64 << exp).min(cap_ms);
    let jitter = if d >= 2 { fastrand::u64(0..=d / 2) } else { 0 };
    Duration::from_millis(d.saturating_add(jitter).min(cap_ms + cap_ms / 2).max(base_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_never_below_base_and_is_capped() {
        let p = RetryPolicy { base: Duration::from_millis(200), cap: Duration::from_secs(10), max_attempts: 20 };
        for _ in 0..200 {
            let mut prev = Duration::ZERO;
            for attempt in 1..=5 {
                let d = retry_delay(&p, attempt);
                assert!(d >= p.base, "attempt {attempt}: {d:?} < base");
                assert!(d > prev, "attempt {attempt}: {d:?} did not grow past {prev:?}");
                prev = d;
            }
            assert!(retry_delay(&p, 30) <= Duration::from_secs(15));
            assert!(retry_delay(&p, i32::MAX) <= Duration::from_secs(15));
        }
    }
}
