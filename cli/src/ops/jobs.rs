//! `molecule jobs list|show|retry|cancel` and `molecule queues`.

use serde_json::Value;

use super::client::{Client, Failure, one_line};
use super::render::{fields, print_json, table, text, time};
use super::{JobId, JobsList, QueuesArgs};

pub async fn list(a: JobsList) -> Result<(), Failure> {
    let c = a.conn.client()?;
    let mut query = a.page.query();
    for (k, v) in [("status", a.status), ("kind", a.kind), ("workspace_id", a.workspace)] {
        if let Some(v) = v {
            query.push((k, v));
        }
    }
    let page = c.get(&["jobs"], &query).await?;
    if a.conn.json {
        print_json(&page);
        return Ok(());
    }
    let items = page["items"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|j| {
            vec![
                text(&j["id"]),
                text(&j["kind"]),
                text(&j["status"]),
                attempts(j),
                text(&j["workspace_id"]),
                time(&j["created_at"]),
                j["last_error"].as_str().map(|e| one_line(e, 60)).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no jobs");
    } else {
        print!("{}", table(&["ID", "KIND", "STATUS", "ATTEMPTS", "WORKSPACE", "CREATED", "LAST ERROR"], &rows));
    }
    next_page_hint(&page);
    Ok(())
}

/// The way to the next page, on standard error (standard output stays the table).
pub fn next_page_hint(page: &Value) {
    if let Some(next) = page["next_cursor"].as_str() {
        eprintln!("more: repeat with --cursor {next}");
    }
}

fn attempts(j: &Value) -> String {
    format!("{}/{}", text(&j["attempts"]), text(&j["max_attempts"]))
}

pub async fn show(a: JobId) -> Result<(), Failure> {
    let c = a.conn.client()?;
    let job = c.get(&["jobs", &a.id], &[]).await?;
    if a.conn.json {
        print_json(&job);
    } else {
        print!("{}", describe(&job));
    }
    Ok(())
}

/// A job as `key: value` lines, then its failed attempts and its result.
fn describe(j: &Value) -> String {
    let mut out = fields(&[
        ("id", text(&j["id"])),
        ("kind", text(&j["kind"])),
        ("status", text(&j["status"])),
        ("attempts", attempts(j)),
        ("workspace", text(&j["workspace_id"])),
        ("created", time(&j["created_at"])),
        ("run at", time(&j["run_at"])),
        ("started", time(&j["started_at"])),
        ("finished", time(&j["finished_at"])),
        ("expires", time(&j["expires_at"])),
        ("last error", text(&j["last_error"])),
    ]);
    if let Some(log) = j["attempt_log"].as_array().filter(|l| !l.is_empty()) {
        out.push_str("failed attempts:\n");
        for a in log {
            out.push_str(&format!("  #{} at {}: {}\n", text(&a["attempt"]), time(&a["failed_at"]), text(&a["error"])));
        }
    }
    if let Some(r) = j.get("result").filter(|r| !r.is_null()) {
        let pretty = serde_json::to_string_pretty(r).unwrap_or_else(|_| r.to_string());
        out.push_str("result:\n");
        for line in pretty.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

#[derive(Clone, Copy)]
pub enum Transition {
    Retry,
    Cancel,
}

pub async fn transition(a: JobId, t: Transition) -> Result<(), Failure> {
    let c = a.conn.client()?;
    let verb = match t {
        Transition::Retry => "retry",
        Transition::Cancel => "cancel",
    };
    let job = c.post(&["jobs", &a.id, verb], None).await?;
    if a.conn.json {
        print_json(&job);
    } else {
        let done = match t {
            Transition::Retry => "queued to run again",
            Transition::Cancel => "cancelled",
        };
        println!("job {} {done}: now {}", text(&job["id"]), text(&job["status"]));
    }
    Ok(())
}

pub async fn queues(a: QueuesArgs) -> Result<(), Failure> {
    // --token, else ADMIN_TOKEN (clap reads both), else MOLECULE_TOKEN.
    let token = a
        .token
        .filter(|t| !t.trim().is_empty())
        .or_else(|| std::env::var("MOLECULE_TOKEN").ok().filter(|t| !t.trim().is_empty()))
        .ok_or_else(|| {
            Failure::Usage("no token: `molecule queues` needs the server's ADMIN_TOKEN (pass --token or set ADMIN_TOKEN)".into())
        })?;
    let c = Client::new(a.url, token.trim().to_string())?;
    let stats = c.get(&["queues"], &[]).await?;
    if a.json {
        print_json(&stats);
        return Ok(());
    }
    let n = |v: &Value| text(v);
    let rows: Vec<Vec<String>> = stats
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|q| {
            vec![
                n(&q["queue"]),
                n(&q["pending"]),
                n(&q["scheduled"]),
                n(&q["running"]),
                n(&q["retrying"]),
                n(&q["failed_last_hour"]),
                n(&q["dead_last_hour"]),
                q["oldest_pending_age_s"].as_f64().map(|s| format!("{s:.1}s")).unwrap_or_else(|| "-".into()),
                n(&q["workers_alive"]),
                n(&q["concurrency"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["QUEUE", "PENDING", "SCHEDULED", "RUNNING", "RETRYING", "FAILED/1H", "DEAD/1H", "OLDEST", "WORKERS", "CONCURRENCY"], &rows)
    );
    Ok(())
}
