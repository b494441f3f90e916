//! The dashboard's HTML. Everything from the database goes through [`esc`].

use chrono::{DateTime, Utc};
use molecule_domain::sessions::Viewer;
use molecule_jobs::status::{JobStatus, JobView};
use molecule_jobs::store::stats::QueueStats;
use molecule_jobs::store::workers::LiveWorker;
use std::fmt::Write;

use crate::routes::workspaces::Workspace;

pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// For query strings built from our own values (queue names, statuses, ids).
fn url_part(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}\
header{background:#1d2733;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}\
header a{color:#cfe3ff;text-decoration:none}header form{margin-left:auto}\
main{padding:16px}table{border-collapse:collapse;margin:8px 0 24px}\
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}\
th{background:#f4f6f8}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.succeeded{color:#17702f}.dead,.failed,.expired,.interrupted{color:#b3261e;font-weight:600}\
.err{color:#b3261e;white-space:pre-wrap;max-width:48em}pre{background:#f4f6f8;padding:8px;white-space:pre-wrap;max-width:80em}\
.muted{color:#777}";

fn layout(title: &str, viewer: Option<Viewer>, body: &str) -> String {
    let who = match viewer {
        Some(Viewer::Operator) => "operator (all organizations)".to_string(),
        Some(Viewer::Org(o)) => format!("organization {}", o.0),
        None => String::new(),
    };
    let nav = if viewer.is_some() {
        format!(
            "<a href=\"/dashboard\">Queues</a><a href=\"/dashboard/jobs\">Jobs</a>\
             <a href=\"/dashboard/workspaces\">Workspaces</a><span class=\"muted\">{}</span>\
             <form method=\"post\" action=\"/dashboard/logout\"><button>Log out</button></form>",
            esc(&who)
        )
    } else {
        String::new()
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · Molecule</title>\
         <style>{STYLE}</style></head><body><header><strong>Molecule</strong>{nav}</header>\
         <main><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title)
    )
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "—".into())
}

pub fn overview(v: Viewer, stats: &[QueueStats], workers: Option<&[LiveWorker]>) -> String {
    let mut b = String::new();
    if matches!(v, Viewer::Org(_)) {
        b.push_str("<p class=\"muted\">Counts of your organization's jobs.</p>");
    }
    b.push_str(
        "<table id=\"queues\"><tr><th>Queue</th><th>Pending</th><th>Scheduled</th><th>Running</th><th>Retrying</th>\
         <th>Failed (1 h)</th><th>Dead (1 h)</th><th>Oldest pending</th><th>Workers</th><th>Concurrency</th></tr>",
    );
    for q in stats {
        let link = |status: &str, n: i64| format!("<a href=\"/dashboard/jobs?queue={}&amp;status={status}\">{n}</a>", url_part(&q.queue));
        let _ = write!(
            b,
            "<tr><td><a href=\"/dashboard/jobs?queue={qu}\">{q}</a></td><td class=n>{p}</td><td class=n>{s}</td>\
             <td class=n>{r}</td><td class=n>{rt}</td><td class=n>{f}</td><td class=n>{d}</td><td class=n>{age:.1} s</td>\
             <td class=n>{w}</td><td class=n>{c}</td></tr>",
            qu = url_part(&q.queue),
            q = esc(&q.queue),
            p = link("pending", q.pending),
            s = link("scheduled", q.scheduled),
            r = link("running", q.running),
            rt = link("retrying", q.retrying),
            f = q.failed_last_hour,
            d = link("dead", q.dead_last_hour),
            age = q.oldest_pending_age_s,
            w = q.workers_alive,
            c = q.concurrency,
        );
    }
    b.push_str("</table>");
    match workers {
        Some(ws) => {
            b.push_str("<h2>Workers</h2><table id=\"workers\"><tr><th>Worker</th><th>Queue</th><th>Running</th><th>Concurrency</th><th>Started</th><th>Last seen</th></tr>");
            for w in ws {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&w.id),
                    esc(&w.queue),
                    w.running,
                    w.concurrency,
                    time(w.started_at),
                    time(Some(w.last_seen))
                );
            }
            if ws.is_empty() {
                b.push_str("<tr><td colspan=6 class=muted>No live workers.</td></tr>");
            }
            b.push_str("</table>");
        }
        None => b.push_str("<p class=\"muted\">Workers are the platform's: operators see them.</p>"),
    }
    layout("Queues", Some(v), &b)
}

pub fn jobs(v: Viewer, rows: &[JobView], status: Option<JobStatus>, queue: Option<&str>, next: Option<&str>) -> String {
    let mut b =
        String::from("<form method=\"get\" action=\"/dashboard/jobs\">Status <select name=\"status\"><option value=\"\">any</option>");
    for s in JobStatus::ALL {
        let sel = if Some(s) == status { " selected" } else { "" };
        let _ = write!(b, "<option{sel}>{}</option>", s.as_str());
    }
    let _ = write!(b, "</select> Queue <input name=\"queue\" value=\"{}\"> <button>Filter</button></form>", esc(queue.unwrap_or("")));
    b.push_str(
        "<table id=\"jobs\"><tr><th>Job</th><th>Queue</th><th>Status</th><th>Attempts</th><th>Created</th>\
         <th>Finished</th><th>Last error</th><th>Result</th></tr>",
    );
    for j in rows {
        let st = j.status.as_str();
        let result = if j.status == JobStatus::Succeeded {
            format!("<a href=\"/dashboard/jobs/{}\">result</a>", url_part(&j.id))
        } else {
            String::new()
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"/dashboard/jobs/{id}\">{ide}</a></td><td>{k}</td><td class=\"{st}\">{st}</td>\
             <td class=n>{a}/{m}</td><td>{c}</td><td>{f}</td><td class=err>{e}</td><td>{result}</td></tr>",
            id = url_part(&j.id),
            ide = esc(&j.id),
            k = esc(&j.kind),
            a = j.attempts,
            m = j.max_attempts,
            c = time(Some(j.created_at)),
            f = time(j.finished_at),
            e = esc(j.last_error.as_deref().unwrap_or("")),
        );
    }
    if rows.is_empty() {
        b.push_str("<tr><td colspan=8 class=muted>No jobs.</td></tr>");
    }
    b.push_str("</table>");
    if let Some(next) = next {
        let _ = write!(
            b,
            "<a href=\"/dashboard/jobs?before={}&amp;status={}&amp;queue={}\">Older jobs →</a>",
            url_part(next),
            status.map(|s| s.as_str()).unwrap_or(""),
            url_part(queue.unwrap_or(""))
        );
    }
    layout("Jobs", Some(v), &b)
}

pub fn job(v: Viewer, j: &JobView, detail: Option<&str>) -> String {
    let mut b = String::from("<table id=\"job\">");
    let row = |b: &mut String, k: &str, val: String| {
        let _ = write!(b, "<tr><th>{k}</th><td>{val}</td></tr>");
    };
    row(&mut b, "Id", esc(&j.id));
    row(&mut b, "Queue", esc(&j.kind));
    row(&mut b, "Status", format!("<span class=\"{0}\">{0}</span>", j.status.as_str()));
    row(&mut b, "Attempts", format!("{} of {}", j.attempts, j.max_attempts));
    row(&mut b, "Created", time(Some(j.created_at)));
    row(&mut b, "Runs at", time(Some(j.run_at)));
    row(&mut b, "Started", time(j.started_at));
    row(&mut b, "Finished", time(j.finished_at));
    row(&mut b, "Expires", time(j.expires_at));
    row(&mut b, "Workspace", j.workspace_id.map(|w| w.to_string()).unwrap_or_else(|| "—".into()));
    if matches!(v, Viewer::Operator) {
        row(&mut b, "Organization", j.org_id.map(|o| o.to_string()).unwrap_or_else(|| "—".into()));
    }
    row(&mut b, "Last error", format!("<span class=err>{}</span>", esc(j.last_error.as_deref().unwrap_or("—"))));
    if let Some(d) = detail {
        row(&mut b, "Error detail (operators)", format!("<span class=err>{}</span>", esc(d)));
    }
    b.push_str("</table>");
    if let Some(r) = &j.result {
        let _ = write!(b, "<h2>Result</h2><pre id=\"result\">{}</pre>", esc(&pretty(r, 64 * 1024)));
    }
    if j.attempt_log.as_array().is_some_and(|a| !a.is_empty()) {
        let _ = write!(b, "<h2>Failed attempts</h2><pre id=\"attempts\">{}</pre>", esc(&pretty(&j.attempt_log, 64 * 1024)));
    }
    layout(&format!("Job {}", j.id), Some(v), &b)
}

fn pretty(v: &serde_json::Value, max: usize) -> String {
    let s = serde_json::to_string_pretty(v).unwrap_or_default();
    let head = molecule_domain::text::head(&s, max);
    if head.len() == s.len() { s } else { format!("{head}\n… ({} bytes in all)", s.len()) }
}

pub fn workspaces(v: Viewer, ws: &[Workspace]) -> String {
    let org_col = matches!(v, Viewer::Operator);
    let mut b = String::from("<table id=\"workspaces\"><tr><th>Workspace</th><th>Name</th>");
    if org_col {
        b.push_str("<th>Organization</th>");
    }
    b.push_str(
        "<th>Runtime</th><th>Tier</th><th>Status</th><th>Instance</th><th>Last heartbeat</th><th>Last error</th><th>Updated</th></tr>",
    );
    for w in ws {
        let _ = write!(b, "<tr><td>{}</td><td>{}</td>", w.id, esc(&w.name));
        if org_col {
            let _ = write!(b, "<td>{}</td>", w.org_id);
        }
        let _ = write!(
            b,
            "<td>{}</td><td class=n>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=err>{}</td><td>{}</td></tr>",
            esc(&w.runtime),
            w.tier,
            w.status.as_str(),
            esc(w.instance_id.as_deref().unwrap_or("—")),
            time(w.last_heartbeat_at),
            esc(w.last_sample_error.as_deref().unwrap_or("")),
            time(Some(w.updated_at)),
        );
    }
    if ws.is_empty() {
        b.push_str("<tr><td colspan=10 class=muted>No workspaces.</td></tr>");
    }
    b.push_str("</table>");
    layout("Workspaces", Some(v), &b)
}

pub fn login(problem: Option<&str>) -> String {
    let p = problem.map(|p| format!("<p class=err id=\"problem\">{}</p>", esc(p))).unwrap_or_default();
    layout(
        "Log in",
        None,
        &format!(
            "{p}<form method=\"post\" action=\"/dashboard/login\"><label>Token (an organization token or ADMIN_TOKEN) \
             <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\" size=\"72\"></label> \
             <button id=\"login\">Log in</button></form>"
        ),
    )
}

pub fn error(status: u16, code: &str, detail: &str) -> String {
    layout(
        &format!("Error {status}"),
        None,
        &format!("<p class=err>{}: {}</p><p><a href=\"/dashboard\">Back</a></p>", esc(code), esc(detail)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_rows_cannot_open_markup() {
        assert_eq!(esc("<script>x</script> & \"q\" 'a'"), "&lt;script&gt;x&lt;/script&gt; &amp; &quot;q&quot; &#39;a&#39;");
        assert_eq!(url_part("a b&c"), "a%20b%26c");
    }
}
