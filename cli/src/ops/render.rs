//! Output for people: aligned tables, `key: value` blocks, and the progress of `--wait`
//! (a spinner redrawn in place on a terminal, one line per change anywhere else).

use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::client::one_line;

/// A JSON value as a table cell: strings as they are, null as `-`, one line.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => one_line(s, 500),
        other => one_line(&other.to_string(), 500),
    }
}

/// An RFC 3339 timestamp to the second, in the API's zone (UTC): `2026-11-30 10:04:05`.
pub fn time(v: &Value) -> String {
    match v.as_str() {
        // By `get`: a server that is not ours could send anything, multi-byte text included.
        Some(s) if s.as_bytes().get(10) == Some(&b'T') && s.get(..10).is_some() && s.get(11..19).is_some() => {
            format!("{} {}", &s[..10], &s[11..19])
        }
        _ => text(v),
    }
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count() + 2));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `key: value` lines, keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{k:<w$}  {v}\n", w = w + 1, k = format!("{k}:"))).collect()
}

/// The JSON the API returned, for `--json`.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

/// What `--wait` shows while it waits, on standard error (standard output keeps the
/// result: a table, or the final JSON with `--json`).
pub struct Progress {
    tty: bool,
    started: Instant,
    current: Option<String>,
    frame: usize,
    drawn: bool,
}

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
/// How often the spinner turns on a terminal.
const TICK: Duration = Duration::from_millis(100);

impl Progress {
    pub fn new() -> Progress {
        Progress { tty: std::io::stderr().is_terminal(), started: Instant::now(), current: None, frame: 0, drawn: false }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The current state, e.g. `provisioning: started; waiting for its agent to register`.
    /// Off a terminal a line is written only when it differs from the previous one.
    pub fn update(&mut self, state: String) {
        if self.current.as_deref() == Some(state.as_str()) {
            if self.tty {
                self.draw();
            }
            return;
        }
        if !self.tty {
            eprintln!("[{:>6.1}s] {state}", self.started.elapsed().as_secs_f64());
        }
        self.current = Some(state);
        if self.tty {
            self.draw();
        }
    }

    /// Waits `d`, turning the spinner meanwhile.
    pub async fn pause(&mut self, d: Duration) {
        if !self.tty {
            tokio::time::sleep(d).await;
            return;
        }
        let until = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(TICK.min(until - tokio::time::Instant::now())).await;
            self.frame += 1;
            self.draw();
        }
    }

    /// Ends the progress display: the spinner line is cleared; off a terminal `last`
    /// (the final state; empty: none) is written as one more line.
    pub fn finish(&mut self, last: &str) {
        if self.tty {
            if self.drawn {
                eprint!("\r\x1b[2K");
                let _ = std::io::stderr().flush();
            }
        } else if !last.is_empty() && self.current.as_deref() != Some(last) {
            eprintln!("[{:>6.1}s] {last}", self.started.elapsed().as_secs_f64());
        }
        self.current = Some(last.to_string());
    }

    fn draw(&mut self) {
        let Some(state) = &self.current else { return };
        let suffix = format!(" ({:.0} s)", self.started.elapsed().as_secs_f64());
        // Wider than the terminal, the line would wrap and `\r` would no longer rewrite it:
        // the state is cut (with `…`) to what fits beside the spinner and the time.
        let room = terminal_width().saturating_sub(1 + 2 + suffix.len()).max(10);
        let line = format!("{} {}{suffix}", FRAMES[self.frame % FRAMES.len()], one_line(state, room));
        eprint!("\r\x1b[2K{line}");
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }
}

/// Columns of the terminal on standard error (80 when it cannot be told).
fn terminal_width() -> usize {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 { ws.ws_col as usize } else { std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(80) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_cells_stay_on_one_line() {
        let t = table(
            &["ID", "NAME", "STATUS"],
            &[
                vec!["1".into(), "alpha".into(), "online".into()],
                vec!["22".into(), text(&Value::String("two\nlines".into())), text(&Value::Null)],
            ],
        );
        assert_eq!(t, "ID  NAME       STATUS\n1   alpha      online\n22  two lines  -\n");
        assert_eq!(time(&Value::String("2026-11-30T10:04:05.123456Z".into())), "2026-11-30 10:04:05");
        assert_eq!(fields(&[("id", "x".into()), ("status", "online".into())]), "id:      x\nstatus:  online\n");
    }
}
