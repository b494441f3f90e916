//! Where a pool's next claim starts: at its cursor (where its last claim ended in claim
//! order) or at the head of the queue.
//!
//! Claimed jobs' entries stay in the claim index until a vacuum reaches it, and a claim
//! from the head steps over every one of them: a claim late in a 1M-job drain cost twice
//! one at its start, and after the drain a pickup on that queue took 90 ms (p50; its claim
//! read 8,268 index pages). From the cursor the scan starts after them (p50 1.7 ms). Jobs that sort before the cursor (a higher priority,
//! an earlier run_at, rows another worker had locked) are left to a claim from the head,
//! made at least once a second while claims are made, and at once after a short claim from
//! the cursor when a backlog just ran out (the next priority's jobs) or the last one from
//! the head is a second old (an idle pool's pickup finds its job from the cursor, then
//! looks at the head behind it).

use std::time::{Duration, Instant};

use crate::store::{ClaimCursor, Claimed};

/// How long a pool claims from its cursor before it claims from the head again: about the
/// longest a job that sorts before the cursor waits (plus, in a full pool, for a slot).
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

    /// The cursor to claim after, or None: claim from the head (noted as made now). While
    /// a backlog drains, from the head once a second; an idle pool's pickup comes from the
    /// cursor, and [`Self::claimed`] sends it to the head after.
    pub(super) fn next(&mut self, now: Instant) -> Option<ClaimCursor> {
        let head = std::mem::take(&mut self.head_next) || (self.backlog && now.duration_since(self.from_head_at) >= FROM_HEAD_EVERY);
        match &self.cursor {
            Some(c) if !head => Some(c.clone()),
            _ => {
                self.from_head_at = now;
                None
            }
        }
    }

    /// What a claim (from `from`, asking for `want`) got.
    pub(super) fn claimed(&mut self, from_cursor: bool, rows: &[Claimed], want: usize, now: Instant) {
        let full = rows.len() == want;
        self.head_next = from_cursor && !full && (self.backlog || now.duration_since(self.from_head_at) >= FROM_HEAD_EVERY);
        self.backlog = full;
        // An empty claim keeps the cursor: the jobs to come sort after it.
        if !rows.is_empty() {
            self.cursor = ClaimCursor::after(rows);
        }
    }

    /// A claim from the head comes next, at once (no wait for a wake-up before it).
    pub(super) fn head_next(&self) -> bool {
        self.head_next
    }

    /// Where the last claim ended (what the next due job is looked for after, when a claim
    /// comes back short: from the head, `min(run_at)` reads every entry of the queue).
    pub(super) fn cursor(&self) -> Option<&ClaimCursor> {
        self.cursor.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn job(id: &str) -> Claimed {
        Claimed {
            id: id.into(),
            job: vec![],
            attempts: 1,
            max_attempts: 1,
            org_id: None,
            workspace_id: None,
            expired: false,
            fence: 1,
            priority: Some(0),
            run_at: DateTime::from_timestamp(1, 0).unwrap(),
        }
    }

    fn jobs(n: usize) -> Vec<Claimed> {
        (0..n).map(|i| job(&format!("j{i:04}"))).collect()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_backlog_drains_from_the_cursor_and_from_the_head_once_a_second() {
        let t0 = Instant::now();
        let mut s = ClaimStart::new(t0);
        assert_eq!(s.next(t0), None, "no cursor yet: from the head");
        s.claimed(false, &jobs(100), 100, t0);
        let c = s.next(t0 + 10 * MS).expect("a full claim: from its cursor next");
        assert_eq!(c, ClaimCursor::after(&jobs(100)).unwrap());
        s.claimed(true, &jobs(100), 100, t0 + 10 * MS);
        assert!(!s.head_next());
        assert!(s.next(t0 + 999 * MS).is_some());
        s.claimed(true, &jobs(100), 100, t0 + 999 * MS);
        assert_eq!(s.next(t0 + 1000 * MS), None, "a second on: from the head");
        s.claimed(false, &jobs(100), 100, t0 + 1000 * MS);
        assert!(s.next(t0 + 1001 * MS).is_some(), "then from the cursor again");
    }

    #[test]
    fn when_a_backlog_runs_out_from_the_cursor_the_head_is_claimed_at_once() {
        let t0 = Instant::now();
        let mut s = ClaimStart::new(t0);
        s.next(t0);
        s.claimed(false, &jobs(100), 100, t0);
        s.next(t0 + MS).unwrap();
        s.claimed(true, &jobs(30), 100, t0 + MS);
        assert!(s.head_next(), "short after a backlog: the next priority's jobs may be waiting");
        assert_eq!(s.next(t0 + 2 * MS), None);
        assert!(!s.head_next(), "once");
    }

    #[test]
    fn an_idle_pool_picks_up_from_the_cursor_and_looks_at_the_head_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut s = ClaimStart::new(t0);
        s.next(t0);
        s.claimed(false, &jobs(5), 100, t0);
        // An empty claim keeps the cursor.
        s.next(t0 + MS).unwrap();
        s.claimed(true, &[], 100, t0 + MS);
        assert!(!s.head_next(), "the head was looked at a millisecond ago");
        // A pickup within the second: from the cursor, and nothing more.
        let c = s.next(t0 + 500 * MS).expect("from the cursor");
        assert_eq!(c, ClaimCursor::after(&jobs(5)).unwrap());
        s.claimed(true, &[job("k0001")], 100, t0 + 500 * MS);
        assert!(!s.head_next());
        // A pickup two seconds later: from the cursor too (its job is not kept waiting
        // behind a scan of the head), and then, the second being up, from the head at once.
        assert!(s.next(t0 + 2500 * MS).is_some());
        s.claimed(true, &[job("k0002")], 100, t0 + 2500 * MS);
        assert!(s.head_next());
        assert_eq!(s.next(t0 + 2501 * MS), None);
        s.claimed(false, &[], 100, t0 + 2501 * MS);
        assert!(!s.head_next());
        assert!(s.next(t0 + 2600 * MS).is_some(), "then from the cursor again");
    }

    #[test]
    fn a_claim_of_jobs_without_a_priority_forgets_the_cursor() {
        let t0 = Instant::now();
        let mut s = ClaimStart::new(t0);
        s.next(t0);
        s.claimed(false, &jobs(100), 100, t0);
        let mut null = job("n");
        null.priority = None;
        s.claimed(true, &[null], 100, t0 + MS);
        s.head_next = false;
        assert_eq!(s.next(t0 + 2 * MS), None, "no cursor to claim after");
    }
}
