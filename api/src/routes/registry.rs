//! A12: agents register and heartbeat with their workspace token.

use axum::extract::State;
use axum::Json;
use molecule_domain::{ssrf, tokens, WorkspaceStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiJson;
use crate::routes::workspaces::{record_event, DeliveryMode};
use crate::AppState;

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Where the platform reaches the agent (push delivery). http(s), never an internal address.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub delivery_mode: Option<DeliveryMode>,
    /// The agent's A2A card, kept as the agent sent it.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub agent_card: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct Registered {
    pub workspace_id: Uuid,
    pub status: WorkspaceStatus,
    pub delivery_mode: DeliveryMode,
    /// What the platform presents as bearer when it calls the agent.
    pub platform_inbound_secret: String,
}

fn workspace_of(p: &Principal) -> ApiResult<Uuid> {
    p.workspace
        .map(|w| w.0)
        .ok_or_else(|| ApiError::Forbidden("registry routes take the workspace's own token".into()))
}

/// A12: register (or re-register) the calling workspace's agent.
#[utoipa::path(post, path = "/registry/register", tag = "registry", request_body = Register, security(("bearer" = [])),
    responses(
        (status = 200, body = Registered),
        (status = 400, description = "bad body or URL", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "not a workspace token", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn register(State(st): State<AppState>, p: Principal, ApiJson(body): ApiJson<Register>) -> ApiResult<Json<Registered>> {
    let ws = workspace_of(&p)?;
    let mut tx = st.db.begin().await?;
    let row: Option<(WorkspaceStatus, DeliveryMode, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT status, delivery_mode, url, platform_inbound_secret FROM workspaces WHERE id = $1 AND org_id = $2 FOR UPDATE",
    )
    .bind(ws)
    .bind(p.org.0)
    .fetch_optional(&mut *tx)
    .await?;
    let (status, stored_mode, stored_url, secret) = row.ok_or(ApiError::NotFound("workspace"))?;
    // payload → stored row (external workspaces are created with poll) → push.
    let mode = body.delivery_mode.unwrap_or(stored_mode);
    let url = body.url.clone().or(stored_url);
    if mode == DeliveryMode::Push {
        let u = url.as_deref().ok_or_else(|| ApiError::bad("invalid_url", "push delivery needs the agent's url"))?;
        ssrf::check(u, st.auth.allow_loopback_agents)
            .await
            .map_err(|why| ApiError::bad("invalid_url", format!("url refused: {why}")))?;
    }
    // Lazy heal: a workspace without an inbound secret gets one now.
    let secret = match secret {
        Some(s) => s,
        None => tokens::mint_inbound_secret(),
    };
    let new_status: WorkspaceStatus = sqlx::query_scalar(
        "UPDATE workspaces SET delivery_mode = $2, url = $3, platform_inbound_secret = $4, last_heartbeat_at = now(), \
         status = CASE WHEN status IN ('provisioning', 'awaiting_agent') THEN 'online'::workspace_status ELSE status END, \
         updated_at = now() WHERE id = $1 RETURNING status",
    )
    .bind(ws)
    .bind(mode)
    .bind(&url)
    .bind(&secret)
    .fetch_one(&mut *tx)
    .await?;
    if new_status != status {
        record_event(&mut tx, p.org, ws, "WORKSPACE_ONLINE", serde_json::json!({ "from": status })).await?;
    }
    tx.commit().await?;
    tracing::info!(event = "registry.registered", workspace_id = %ws, org_id = %p.org, status = new_status.as_str());
    Ok(Json(Registered { workspace_id: ws, status: new_status, delivery_mode: mode, platform_inbound_secret: secret }))
}

#[derive(Serialize, ToSchema)]
pub struct Beat {
    pub status: WorkspaceStatus,
}

/// A12: the agent is alive.
#[utoipa::path(post, path = "/registry/heartbeat", tag = "registry", security(("bearer" = [])),
    responses(
        (status = 200, body = Beat),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn heartbeat(State(st): State<AppState>, p: Principal) -> ApiResult<Json<Beat>> {
    let ws = workspace_of(&p)?;
    let status: Option<WorkspaceStatus> = sqlx::query_scalar(
        "UPDATE workspaces SET last_heartbeat_at = now(), \
         status = CASE WHEN status = 'awaiting_agent' THEN 'online'::workspace_status ELSE status END \
         WHERE id = $1 AND org_id = $2 RETURNING status",
    )
    .bind(ws)
    .bind(p.org.0)
    .fetch_optional(&st.db)
    .await?;
    Ok(Json(Beat { status: status.ok_or(ApiError::NotFound("workspace"))? }))
}
