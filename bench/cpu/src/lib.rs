//! CPU time of a local PostgreSQL cluster and of this process, read from `/proc`: what a
//! bench divides by the jobs it ran, so a figure says how much work a job cost and not
//! only how fast it went on a machine shared with other work (Linux only; elsewhere every
//! reading is 0).

use std::time::Instant;

/// The fields of a `/proc/<pid>/stat` line after "pid (comm) ": [`PPID`], and the CPU
/// ticks in [`UTIME`]..=[`CSTIME`] (utime, stime, then the reaped children's).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(") ").map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default()
}
const PPID: usize = 1;
const UTIME: usize = 11;
const CUTIME: usize = 13;
const CSTIME: usize = 14;

/// Seconds of the ticks in `fields[range]` (USER_HZ is 100 on Linux).
fn ticks_s(fields: &[&str], range: std::ops::Range<usize>) -> f64 {
    fields.get(range).map(|t| t.iter().filter_map(|v| v.parse::<u64>().ok()).sum::<u64>()).unwrap_or(0) as f64 / 100.0
}

fn self_stat() -> String {
    std::fs::read_to_string("/proc/self/stat").unwrap_or_default()
}

/// CPU seconds of this process (all its threads).
pub fn own_cpu_s() -> f64 {
    ticks_s(&stat_fields(&self_stat()), UTIME..CUTIME)
}

/// CPU seconds of this process's exited children.
pub fn children_cpu_s() -> f64 {
    ticks_s(&stat_fields(&self_stat()), CUTIME..CSTIME + 1)
}

/// CPU seconds of one cluster: its postmaster (with the backends it reaped) and the
/// processes it runs now. Counting every `postgres` process instead went negative when
/// another cluster's processes ended between two samples.
pub fn cluster_cpu_s(postmaster: u32) -> f64 {
    let mut secs = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let pid: Option<u32> = e.file_name().to_str().and_then(|n| n.parse().ok());
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
            let f = stat_fields(&stat);
            let ppid: Option<u32> = f.get(PPID).and_then(|v| v.parse().ok());
            if pid == Some(postmaster) || ppid == Some(postmaster) {
                secs += ticks_s(&f, UTIME..CSTIME + 1);
            }
        }
    }
    secs
}

/// The postmaster of the backend `backend_pid` (`SELECT pg_backend_pid()`): its parent,
/// if that is a local `postgres` process. A remote cluster's backend pid may be some
/// unrelated local process; None then (its CPU cannot be read here).
pub fn postmaster_of(backend_pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{backend_pid}/stat")).ok()?;
    let ppid: u32 = stat_fields(&stat).get(PPID).and_then(|v| v.parse().ok())?;
    let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
    matches!(comm.trim(), "postgres" | "postmaster").then_some(ppid)
}

/// CPU time of the local cluster and of this process at one instant.
pub struct Cpu {
    postmaster: Option<u32>,
    pg: Option<f64>,
    own: f64,
    at: Instant,
}

/// CPU per job over a run, in µs: PostgreSQL's, and this process's; `cores`: both
/// together per second of the run (2.0 = two cores busy all along).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    pub pg_us: f64,
    pub own_us: f64,
    pub cores: f64,
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgreSQL {:.1} µs + this process {:.1} µs ({:.2} cores busy)", self.pg_us, self.own_us, self.cores)
    }
}

impl Cpu {
    pub fn now(postmaster: Option<u32>) -> Self {
        Cpu { postmaster, pg: postmaster.map(cluster_cpu_s), own: own_cpu_s(), at: Instant::now() }
    }

    /// What was used since this sample, per job of `jobs`.
    pub fn used(&self, jobs: usize) -> CpuUse {
        let (secs, after) = (self.at.elapsed().as_secs_f64(), Cpu::now(self.postmaster));
        let pg = after.pg.zip(self.pg).map(|(a, b)| a - b).unwrap_or(0.0);
        let own = after.own - self.own;
        let per = 1e6 / jobs.max(1) as f64;
        CpuUse { pg_us: pg * per, own_us: own * per, cores: (pg + own) / secs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_splits_after_the_command_even_with_spaces_and_parens_in_it() {
        let line = "4242 (postgres: a (b) c) S 17 4242 4242 0 -1 4194560 10 0 0 0 250 50 7 3 20 0 1 0";
        let f = stat_fields(line);
        assert_eq!(f.get(PPID), Some(&"17"));
        assert_eq!(ticks_s(&f, UTIME..CUTIME), 3.0);
        assert_eq!(ticks_s(&f, CUTIME..CSTIME + 1), 0.1);
    }

    #[test]
    fn this_process_burns_cpu_it_can_see() {
        let before = Cpu::now(None);
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = before.used(1);
        // At least two ticks, however loaded the machine; a wrong field would read 0.
        assert!(used.own_us >= 20_000.0, "300 ms of spinning read as {} µs", used.own_us);
        assert!(used.cores > 0.0);
        assert_eq!(used.pg_us, 0.0);
    }
}
