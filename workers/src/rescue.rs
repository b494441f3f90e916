//! J4 rescue capture, fired only by the two boot-failure verdicts (provision timeout,
//! bootstrap-failed). Collects the fixed section set through the backend, redacts every
//! section (no redactor → nothing is stored or shipped: fail closed), persists exactly one
//! bundle row, and ships the sections to Loki when LOKI_URL is set. Its own 45 s budget;
//! it never changes the workspace's status (and nothing reaps a failed workspace).

use molecule_domain::WorkspaceId;
use molecule_domain::redact::Redactor;
use molecule_jobs::handler::HandlerResult;
use molecule_jobs::{JobContext, JobError};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

use crate::Deps;
use crate::provision::db_err;

pub const BUDGET: Duration = Duration::from_secs(45);
pub const SECTION_MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RescueArgs {
    pub workspace_id: uuid::Uuid,
    pub trigger: String,
}

pub async fn run(d: &Deps, ctx: &JobContext, a: RescueArgs) -> HandlerResult {
    if !matches!(a.trigger.as_str(), "provision_timeout" | "bootstrap_failed") {
        return Err(JobError::permanent("invalid_input", format!("rescue capture is only for boot failures, not {:?}", a.trigger)));
    }
    let Some(redactor) = d.redactor.clone() else {
        return Err(JobError::permanent("no_redactor", "no secret redactor is wired: nothing captured (fail closed)"));
    };
    match tokio::time::timeout(BUDGET, capture(d, ctx, &a, &redactor)).await {
        Ok(r) => r,
        Err(_) => Err(JobError::retryable("rescue_budget", "rescue capture ran out of its 45 s budget")),
    }
}

async fn capture(d: &Deps, ctx: &JobContext, a: &RescueArgs, redactor: &Redactor) -> HandlerResult {
    let ws = WorkspaceId(a.workspace_id);
    let org: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT org_id FROM workspaces WHERE id = $1").bind(ws.0).fetch_optional(&d.db).await.map_err(db_err)?;
    let Some(org) = org else {
        return Ok(json!({ "skipped": "workspace does not exist" }));
    };
    // At-least-once delivery: one bundle per capture job.
    let existing: Option<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM rescue_bundles WHERE job_id = $1")
        .bind(ctx.id.as_str())
        .fetch_optional(&d.db)
        .await
        .map_err(db_err)?;
    if let Some(id) = existing {
        return Ok(json!({ "bundle_id": id, "repeat": true }));
    }
    let raw = d.backend.rescue_sections(ws).await.map_err(|e| JobError::retryable("backend", e.to_string()))?;
    let sections: serde_json::Map<String, serde_json::Value> = raw
        .into_iter()
        .map(|(name, text)| {
            let redacted = redactor.redact(&text).replace('\0', "\u{FFFD}");
            (name, json!(molecule_domain::text::tail(&redacted, SECTION_MAX_BYTES)))
        })
        .collect();
    let bundle: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO rescue_bundles (workspace_id, org_id, trigger, sections, job_id) VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(ws.0)
    .bind(org)
    .bind(&a.trigger)
    .bind(serde_json::Value::Object(sections.clone()))
    .bind(ctx.id.as_str())
    .fetch_one(&d.db)
    .await
    .map_err(db_err)?;
    let shipped = match &d.loki_url {
        Some(url) => match ship(url, &org.to_string(), &ws.to_string(), &a.trigger, &sections).await {
            Ok(()) => true,
            Err(e) => {
                // The bundle is stored; shipping is best effort.
                tracing::warn!(workspace_id = %ws, error = %e, "rescue bundle not shipped to Loki");
                false
            }
        },
        None => false,
    };
    tracing::info!(event = "rescue.captured", workspace_id = %ws, org_id = %org, job_id = %ctx.id, shipped);
    Ok(json!({ "bundle_id": bundle, "sections": sections.len(), "shipped": shipped }))
}

/// Loki push API: one stream (labels kind, org, workspace_id, event_type), one line per section.
async fn ship(base: &str, org: &str, ws: &str, trigger: &str, sections: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let values: Vec<serde_json::Value> = sections
        .iter()
        .enumerate()
        .map(|(i, (name, text))| {
            let line = json!({ "section": name, "trigger": trigger, "text": text }).to_string();
            json!([(now + i as i64).to_string(), line])
        })
        .collect();
    let body = json!({ "streams": [{
        "stream": { "kind": "rescue", "org": org, "workspace_id": ws, "event_type": "rescue.bundle" },
        "values": values,
    }]});
    let url = format!("{}/loki/api/v1/push", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client.post(&url).json(&body).send().await.map_err(|e| format!("push failed: {}", e.without_url()))?;
    if !resp.status().is_success() {
        return Err(format!("push answered {}", resp.status()));
    }
    Ok(())
}

/// S7: rescue bundles captured longer ago than `older_than`, in batches.
pub async fn prune(db: &sqlx::PgPool, older_than: std::time::Duration, batch: i64) -> Result<u64, sqlx::Error> {
    molecule_domain::db::delete_in_batches(
        db,
        "DELETE FROM rescue_bundles WHERE id IN \
         (SELECT id FROM rescue_bundles WHERE captured_at < now() - make_interval(secs => $1) ORDER BY captured_at LIMIT $2)",
        older_than,
        batch,
    )
    .await
}
