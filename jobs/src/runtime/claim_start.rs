//! Where a fetcher's next claim starts (one per claim shard of a pool): at its cursor
//! (where its last claim ended in claim order) or at the head of its shard of the queue.
//!
//! Claimed jobs' entries stay in the claim index until a vacuum reaches it, and a claim
//! from the head steps over every one of them: a claim late in a 1M-job drain cost twice
//! one at its start, and after the drain a pickup on that queue took 90 ms (p50; its
//! claim read 8,268 index pages). From the cursor the scan starts after them.
//!
//! Jobs the cursor cannot see are left to a claim from the head: those that sort before
//! it (a higher priority; an earlier run_at, as a job enqueued in a transaction that
//! began before the cursor's job and committed after it has) and those of a lower
//! priority. So a claim from the cursor that comes back short is followed at once by one
//! from the head (an idle pool's pickup takes its job from the cursor, then looks at the
//! head behind it), and while a backlog drains, claims go to the head once a second.

use std::time::{Duration, Instant};

use crate::store::{ClaimCursor, Claimed};

/// While a backlog drains, how long a pool claims from its cursor before it claims from
/// the head again: about the longest a job the cursor cannot see waits behind a backlog
/// (plus, in a full pool, for a slot).
pub(super) const FROM_HEAD_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) struct ClaimStart {
    cursor: Option<ClaimCursor>,
    /// The last claim got all it asked for: more jobs are waiting.
    backlog: bool,
    /// The next claim is from the head, and nothing is waited for before it.
    head_next: bool,
    from_head_at: Instant,
}

impl ClaimStart {
    pub(super) fn new(now: Instant) -> Self {
        ClaimStart { cursor: None, backlog: false, head_next: false, from_head_at: now }
    }

    /// The cursor to claim after, or None: claim from the head (noted as made now).
    pub(super) fn next(&mut self, now: Instant) -> Option<ClaimCursor> {
        let due = self.backlog && now.duration_since(self.from_head_at) >= FROM_HEAD_EVERY;
        let head = std::mem::take(&mut self.head_next) || due;
        match &self.cursor {
            Some(c) if !head => Some(c.clone()),
            _ => {
                self.from_head_at = now;
                None
            }
        }
    }

    /// What a claim (from the cursor or not, asking for `want`) got.
    pub(super) fn claimed(&mut self, from_cursor: bool, rows: &[Claimed], want: usize) {
        let full = rows.len() == want;
        self.head_next = from_cursor && !full;
        self.backlog = full;
        // An empty claim keeps the cursor (where the next jobs of its priority will be).
        if !rows.is_empty() {
            self.cursor = ClaimCursor::after(rows);
        }
    }

    /// A claim from the head comes next, at once (no wait for a wake-up before it).
    pub(super) fn head_next(&self) -> bool {
        self.head_next
    }

    /// Where the last claim ended: after a short claim the next due job is looked for
    /// after it (over the whole queue, `min(run_at)` reads every entry of the queue).
    pub(super) fn cursor(&self) -> Option<&ClaimCursor> {
        self.cursor.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> Claimed {
        Claimed::for_test(id, Some(0), 1)
    }

    /// `n` jobs, ids from `from` on (same priority and run_at: claim order is id order).
    fn jobs(from: usize, n: usize) -> Vec<Claimed> {
        (from..from + n).map(|i| job(&format!("j{i:04}"))).collect()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_backlog_drains_from_the_cursor_and_from_the_head_once_a_second() {
        let t0 = Instant::now();
        let mut s = ClaimStart::new(t0);
        assert_eq!(s.next(t0), None, "no cursor yet: from the head");
        s.claimed(false, &jobs(0, 100), 100);
        assert_eq!(s.next(t0 + 10 * MS), ClaimCursor::after(&jobs(0, 100)), "a full claim: from its cursor next");
        s.claimed(true, &jobs(100, 100), 100);
        assert_eq!(s.next(t0 + 999 * MS), ClaimCursor::after(&jobs(100, 100)), "the cursor moves with each claim");
        s.claimed(true, &jobs(200, 100), 100);
        assert_eq!(s.next(t0 + 1000 * MS), None, "a second on: from the head");
        s.claimed(false, &jobs(300, 100), 100);
        assert!(s.next(t0 + 1001 * MS).is_some(), "then from the cursor again");
    }

    #[test]
    fn a_short_claim_from_the_cursor_is_followed_at_once_by_one_from_the_head() {
        let t0 = Instant::now();
        let mut s = ClaimStart::new(t0);
        s.next(t0);
        s.claimed(false, &jobs(0, 100), 100);
        s.next(t0 + MS).unwrap();
        s.claimed(true, &jobs(100, 30), 100);
        assert!(s.head_next(), "the backlog ran out: the next priority's jobs may be waiting");
        assert_eq!(s.next(t0 + 2 * MS), None);
        s.claimed(false, &[], 100);
        assert!(!s.head_next(), "once");
        // An idle pool's pickup: its job from the cursor (kept over the empty claim), then
        // the head at once — a job committed late, sorting before the cursor, is not left
        // waiting for a second.
        assert_eq!(s.next(t0 + 3 * MS), ClaimCursor::after(&jobs(100, 30)));
        s.claimed(true, &jobs(500, 1), 4);
        assert!(s.head_next());
        assert_eq!(s.next(t0 + 4 * MS), None);
        s.claimed(false, &[], 4);
        assert_eq!(s.next(t0 + 5 * MS), ClaimCursor::after(&jobs(500, 1)));
    }

    #[test]
    fn a_claim_of_jobs_without_a_priority_forgets_the_cursor() {
        let t0 = Instant::now();
        let mut s = ClaimStart::new(t0);
        s.next(t0);
        s.claimed(false, &jobs(0, 100), 100);
        let mut null = job("n");
        null.priority = None;
        s.claimed(false, &[null], 100);
        assert_eq!(s.next(t0 + 2 * MS), None, "no cursor to claim after");
    }
}
