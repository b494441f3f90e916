//! `molecule workspaces list|show|create|delete`, and `--wait`: poll the workspace (and
//! its latest event, for what it is doing) until it is online or failed; after a delete,
//! poll the stop jobs until the containers or instances are gone.

use serde_json::{Value, json};
use std::time::{Duration, Instant};

use super::client::{Client, Failure, one_line};
use super::jobs::next_page_hint;
use super::render::{Progress, fields, print_json, table, text, time};
use super::{Wait, WorkspaceCreate, WorkspaceDelete, WorkspaceId, WorkspacesList};

/// How often --wait asks the API.
const POLL: Duration = Duration::from_millis(500);

pub async fn list(a: WorkspacesList) -> Result<(), Failure> {
    let c = a.conn.client()?;
    let page = c.get(&["workspaces"], &a.page.query()).await?;
    if a.conn.json {
        print_json(&page);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = page["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|w| {
            vec![
                text(&w["id"]),
                text(&w["name"]),
                text(&w["runtime"]),
                text(&w["tier"]),
                text(&w["status"]),
                time(&w["created_at"]),
                w["last_sample_error"].as_str().map(|e| one_line(e, 60)).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no workspaces");
    } else {
        print!("{}", table(&["ID", "NAME", "RUNTIME", "TIER", "STATUS", "CREATED", "LAST ERROR"], &rows));
    }
    next_page_hint(&page);
    Ok(())
}

pub async fn show(a: WorkspaceId) -> Result<(), Failure> {
    let c = a.conn.client()?;
    let ws = c.get(&["workspaces", &a.id], &[]).await?;
    if a.conn.json {
        print_json(&ws);
    } else {
        print!("{}", describe(&ws));
    }
    Ok(())
}

fn describe(w: &Value) -> String {
    fields(&[
        ("id", text(&w["id"])),
        ("name", text(&w["name"])),
        ("status", text(&w["status"])),
        ("runtime", text(&w["runtime"])),
        ("tier", text(&w["tier"])),
        ("delivery", text(&w["delivery_mode"])),
        ("parent", text(&w["parent_id"])),
        ("url", text(&w["url"])),
        ("instance", text(&w["instance_id"])),
        ("heartbeat", time(&w["last_heartbeat_at"])),
        ("last error", text(&w["last_sample_error"])),
        ("created", time(&w["created_at"])),
        ("updated", time(&w["updated_at"])),
    ])
}

pub async fn create(a: WorkspaceCreate) -> Result<(), Failure> {
    let c = a.conn.client()?;
    let mut body = json!({ "name": a.name, "runtime": a.runtime });
    if let Some(t) = a.tier {
        body["tier"] = json!(t);
    }
    if let Some(d) = &a.delivery_mode {
        body["delivery_mode"] = json!(d);
    }
    if let Some(p) = &a.parent {
        body["parent_id"] = json!(p);
    }
    let created = c.post(&["workspaces"], Some(&body)).await?;
    let ws = &created["workspace"];
    let id = ws["id"].as_str().ok_or_else(|| unexpected(&created))?.to_string();
    if !a.wait.wait {
        if a.conn.json {
            print_json(&created);
        } else {
            println!("workspace {id} ({}) created: {}; provision job {}", text(&ws["name"]), text(&ws["status"]), text(&created["job_id"]));
        }
        return Ok(());
    }
    eprintln!("workspace {id} ({}) created; waiting until it is online (up to {} s)", text(&ws["name"]), a.wait.timeout);
    let ws = wait_online(&c, &id, created["job_id"].as_str(), a.wait).await;
    finish_wait(ws, a.conn.json, |w| format!("workspace {id} ({}) is online", text(&w["name"])))
}

/// Prints the final workspace (the JSON with --json, else its fields and `done`); a
/// failure is returned for `main` to print and exit with.
fn finish_wait(r: Result<Value, (Option<Value>, Failure)>, json: bool, done: impl Fn(&Value) -> String) -> Result<(), Failure> {
    match r {
        Ok(ws) => {
            if json {
                print_json(&ws);
            } else {
                println!("{}", done(&ws));
                print!("{}", describe(&ws));
            }
            Ok(())
        }
        Err((ws, f)) => {
            // Scripts reading --json still get the workspace as it ended.
            if let (true, Some(ws)) = (json, ws) {
                print_json(&ws);
            }
            Err(f)
        }
    }
}

fn unexpected(v: &Value) -> Failure {
    Failure::Api { status: 200, code: "unexpected_body".into(), detail: format!("unexpected answer: {}", one_line(&v.to_string(), 200)) }
}

/// Polls until online (Ok), failed or removed (Err with the reason), or the timeout.
/// A briefly unreachable API is waited out, up to the timeout.
async fn wait_online(c: &Client, id: &str, job: Option<&str>, w: Wait) -> Result<Value, (Option<Value>, Failure)> {
    let deadline = Instant::now() + Duration::from_secs(w.timeout);
    let mut p = Progress::new();
    let mut last: Option<Value> = None;
    loop {
        match c.get(&["workspaces", id], &[]).await {
            Ok(ws) => {
                let status = ws["status"].as_str().unwrap_or("unknown").to_string();
                match status.as_str() {
                    "online" => {
                        p.finish(&format!("online after {:.1} s", p.elapsed().as_secs_f64()));
                        return Ok(ws);
                    }
                    "failed" => {
                        let why = failure_reason(c, id, &ws).await;
                        p.finish(&format!("failed: {why}"));
                        let f = Failure::Failed(format!("workspace {id} ({}) failed: {why}", text(&ws["name"])));
                        return Err((Some(ws), f));
                    }
                    "removed" => {
                        p.finish("removed");
                        let f = Failure::Failed(format!("workspace {id} was removed while waiting for it to come online"));
                        return Err((Some(ws), f));
                    }
                    _ => {}
                }
                let doing = activity(c, id, job, &ws).await;
                p.update(format!("{status}: {doing}"));
                last = Some(ws);
            }
            Err(f) if f.transient() => p.update(format!("waiting for the API: {f}")),
            Err(f) => {
                p.finish("");
                return Err((last, f));
            }
        }
        if Instant::now() >= deadline {
            let now = last.as_ref().and_then(|w| w["status"].as_str()).unwrap_or("unknown").to_string();
            p.finish(&format!("gave up after {} s", w.timeout));
            let f = Failure::TimedOut(format!(
                "gave up waiting after {} s: workspace {id} is still {now} (it goes on; `molecule workspaces show {id}` tells how it ends)",
                w.timeout
            ));
            return Err((last, f));
        }
        p.pause(POLL).await;
    }
}

/// What a workspace that is not online yet is doing, in a few words: its last error when
/// it has one (a retry under way, a refused registration), else its latest event (and,
/// before anything started, where its provision job is).
async fn activity(c: &Client, id: &str, job: Option<&str>, ws: &Value) -> String {
    if let Some(e) = ws["last_sample_error"].as_str().filter(|e| !e.is_empty()) {
        return one_line(e, 200);
    }
    let latest = c.get(&["workspaces", id, "events"], &[("limit", "1".into())]).await.ok();
    let event = latest.as_ref().and_then(|l| l.get(0));
    match event.and_then(|e| e["event_type"].as_str()) {
        Some("WORKSPACE_CREATED") => match job {
            Some(job) => match c.get(&["jobs", job], &[]).await {
                Ok(j) => match j["status"].as_str() {
                    Some("pending" | "scheduled") => "queued; waiting for a provision worker".into(),
                    Some("running") => format!("starting (provision attempt {} of {})", text(&j["attempts"]), text(&j["max_attempts"])),
                    Some(other) => format!("provision job {other}"),
                    None => "queued".into(),
                },
                Err(_) => "queued".into(),
            },
            None => "queued".into(),
        },
        Some("WORKSPACE_STARTED") => "started; waiting for its agent to register".into(),
        Some("WORKSPACE_PROVISION_RETRYING") => "its start failed; retrying".into(),
        Some("WORKSPACE_REGISTRATION_REFUSED") => {
            format!("its agent's registration was refused: {}", text(&event.unwrap()["payload"]["reason"]))
        }
        Some("WORKSPACE_AWAITING_AGENT") => "waiting for its agent to register".into(),
        Some("RESTART_REQUESTED") => "restart requested".into(),
        Some(other) => other.to_lowercase().replace('_', " "),
        None => match ws["status"].as_str() {
            Some("awaiting_agent") => "waiting for its agent to register".into(),
            _ => "waiting".into(),
        },
    }
}

/// Why a workspace failed: its `last_sample_error` and the reason code of its latest
/// failure event (`image_missing`, `provision_timeout`, `crash_loop` …).
async fn failure_reason(c: &Client, id: &str, ws: &Value) -> String {
    let mut why = ws["last_sample_error"].as_str().map(|e| one_line(e, 500)).unwrap_or_else(|| "no reason recorded".into());
    if let Ok(events) = c.get(&["workspaces", id, "events"], &[("limit", "20".into())]).await {
        let failure = events
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| matches!(e["event_type"].as_str(), Some("WORKSPACE_PROVISION_FAILED" | "WORKSPACE_FAILED")));
        if let Some(code) = failure.and_then(|e| e["payload"]["reason"].as_str().or_else(|| e["payload"]["source"].as_str())) {
            why.push_str(&format!(" [reason: {code}]"));
        }
    }
    why
}

pub async fn delete(a: WorkspaceDelete) -> Result<(), Failure> {
    let c = a.conn.client()?;
    let removed = c.delete(&["workspaces", &a.id]).await?;
    let jobs: Vec<String> = removed["job_ids"].as_array().into_iter().flatten().filter_map(|j| j.as_str().map(String::from)).collect();
    let count = removed["removed"].as_array().map_or(0, Vec::len);
    if !a.wait.wait {
        if a.conn.json {
            print_json(&removed);
        } else if count == 0 {
            println!("workspace {} was already removed", a.id);
        } else {
            println!("workspace {} removed{}; stop jobs: {}", a.id, descendants(count), jobs.join(", "));
        }
        return Ok(());
    }
    if count > 0 {
        eprintln!("workspace {} removed{}; waiting for {} stop job(s) (up to {} s)", a.id, descendants(count), jobs.len(), a.wait.timeout);
    }
    let r = match wait_stopped(&c, &jobs, a.wait).await {
        Ok(()) => c.get(&["workspaces", &a.id], &[]).await.map_err(|f| (None, f)),
        Err(f) => Err((c.get(&["workspaces", &a.id], &[]).await.ok(), f)),
    };
    let id = a.id.clone();
    finish_wait(r, a.conn.json, |_| {
        if count == 0 { format!("workspace {id} was already removed") } else { format!("workspace {id} is removed and stopped") }
    })
}

/// ` with 2 descendants` when the delete took more than the workspace.
fn descendants(removed: usize) -> String {
    match removed {
        0 | 1 => String::new(),
        2 => " with 1 descendant".into(),
        n => format!(" with {} descendants", n - 1),
    }
}

/// Polls the stop jobs until every one succeeded (Ok), one ended for good without
/// succeeding (Err with its error), or the timeout.
async fn wait_stopped(c: &Client, jobs: &[String], w: Wait) -> Result<(), Failure> {
    if jobs.is_empty() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(w.timeout);
    let mut p = Progress::new();
    loop {
        let mut states = Vec::with_capacity(jobs.len());
        let mut unreachable = None;
        for j in jobs {
            match c.get(&["jobs", j], &[]).await {
                Ok(v) => states.push(v),
                Err(f) if f.transient() => {
                    unreachable = Some(f);
                    break;
                }
                Err(f) => {
                    p.finish("");
                    return Err(f);
                }
            }
        }
        if let Some(f) = unreachable {
            p.update(format!("waiting for the API: {f}"));
        } else {
            let status = |v: &Value| v["status"].as_str().unwrap_or("unknown").to_string();
            if let Some(bad) =
                states.iter().find(|v| matches!(status(v).as_str(), "failed" | "dead" | "cancelled" | "expired" | "interrupted"))
            {
                let msg = format!("stop job {} ended {}: {}", text(&bad["id"]), status(bad), text(&bad["last_error"]));
                p.finish(&format!("removed; {msg}"));
                return Err(Failure::Failed(format!("the workspace is removed, but its {msg}")));
            }
            let done = states.iter().filter(|v| status(v) == "succeeded").count();
            if done == jobs.len() {
                p.finish(&format!("removed; stopped after {:.1} s", p.elapsed().as_secs_f64()));
                return Ok(());
            }
            let pending = states.iter().find(|v| status(v) != "succeeded").expect("not all succeeded");
            let mut line =
                format!("removed; stopping: {done} of {} stop job(s) done; job {} {}", jobs.len(), text(&pending["id"]), status(pending));
            if pending["attempts"].as_i64().is_some_and(|n| n > 0) {
                line.push_str(&format!(" (attempt {} of {})", text(&pending["attempts"]), text(&pending["max_attempts"])));
            }
            if let Some(e) = pending["last_error"].as_str() {
                line.push_str(&format!(", last error: {}", one_line(e, 120)));
            }
            p.update(line);
        }
        if Instant::now() >= deadline {
            p.finish(&format!("gave up after {} s", w.timeout));
            return Err(Failure::TimedOut(format!(
                "gave up waiting after {} s for the stop jobs ({}); the workspace is removed and they go on",
                w.timeout,
                jobs.join(", ")
            )));
        }
        p.pause(POLL).await;
    }
}
