//! A12: agents register and heartbeat with their workspace token.

use axum::Json;
use axum::extract::State;
use molecule_domain::a2a::{AgentVersion, card};
use molecule_domain::{WorkspaceStatus, ssrf, tokens};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiJson;
use crate::routes::workspaces::{DeliveryMode, record_event};

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Where the platform reaches the agent (push delivery). http(s), never an internal address.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub delivery_mode: Option<DeliveryMode>,
    /// The agent's A2A card. When `a2a_version` is not given, the generation the card
    /// announces is used.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub agent_card: Option<serde_json::Value>,
    /// The A2A generation the agent speaks: "0.3" or "1.0". It wins over the card; with
    /// neither, the dispatcher reads the agent's card on its first delivery (0.3 when it
    /// finds none).
    #[serde(default)]
    pub a2a_version: Option<AgentVersion>,
}

#[derive(Serialize, ToSchema)]
pub struct Registered {
    pub workspace_id: Uuid,
    pub status: WorkspaceStatus,
    pub delivery_mode: DeliveryMode,
    /// What the platform presents as bearer when it calls the agent.
    pub platform_inbound_secret: String,
    /// The generation the relay will speak to the agent; null until known (see `a2a_version`).
    pub a2a_version: Option<AgentVersion>,
}

fn workspace_of(p: &Principal) -> ApiResult<Uuid> {
    p.workspace.map(|w| w.0).ok_or_else(|| ApiError::Forbidden("registry routes take the workspace's own token".into()))
}

/// A12: register (or re-register) the calling workspace's agent.
///
/// Trust: the URL the platform itself assigned when it started the workspace's container
/// on its own engine (`assigned_url`, a loopback port under host networking) is accepted
/// from that workspace's token as is; any other URL must pass the X5 check. A refusal is
/// also written on the workspace (`last_sample_error`, a `WORKSPACE_REGISTRATION_REFUSED`
/// event), so a workspace that cannot come online says why.
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
    const ROW: &str = "SELECT status, delivery_mode, url, assigned_url, platform_inbound_secret FROM workspaces \
                       WHERE id = $1 AND org_id = $2";
    // The URL is judged before the row is locked: resolving a name can take seconds (a
    // black-holed DNS name takes the whole timeout), and no lock is held meanwhile.
    let before: RegistryRow =
        sqlx::query_as(ROW).bind(ws).bind(p.org.0).fetch_optional(&st.db).await?.ok_or(ApiError::NotFound("workspace"))?;
    // payload → stored row (external workspaces are created with poll) → push.
    let mode = body.delivery_mode.unwrap_or(before.delivery_mode);
    // Push delivers to the URL given now, else the stored one; poll keeps a URL given now
    // (checked: it is used the moment the workspace switches to push) and never fails on
    // an old stored one it does not use.
    let url = match mode {
        DeliveryMode::Push => body.url.clone().or(before.url.clone()),
        DeliveryMode::Poll => body.url.clone(),
    };
    let trusted = |assigned: &Option<String>| url.is_some() && assigned.as_deref() == url.as_deref();
    let checked = match url.as_deref() {
        Some(u) if !trusted(&before.assigned_url) => Some(ssrf::check(u, st.auth.allow_loopback_agents).await),
        _ => None,
    };
    let refusal = match (&checked, url.as_deref()) {
        (Some(Err(why)), _) => Some(format!("url refused: {why}")),
        (_, None) if mode == DeliveryMode::Push => Some("push delivery needs the agent's url".to_string()),
        _ => None,
    };
    if let Some(why) = refusal {
        note_refusal(&st, p.org, ws, &why).await?;
        return Err(ApiError::bad("invalid_url", why));
    }
    let mut tx = st.db.begin().await?;
    let row: RegistryRow = sqlx::query_as(concat!(
        "SELECT status, delivery_mode, url, assigned_url, platform_inbound_secret FROM workspaces ",
        "WHERE id = $1 AND org_id = $2 FOR UPDATE"
    ))
    .bind(ws)
    .bind(p.org.0)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound("workspace"))?;
    // What was judged above must still be what the row holds: trusted as the
    // platform-assigned URL a moment ago but re-provisioned since, or a stored URL another
    // registration replaced meanwhile — the agent registers again.
    let stale_trust = url.is_some() && checked.is_none() && !trusted(&row.assigned_url);
    let stale_url = body.url.is_none() && mode == DeliveryMode::Push && row.url != before.url;
    if stale_trust || stale_url {
        return Err(ApiError::Conflict {
            code: "registration_changed",
            detail: "the workspace was started or registered again meanwhile; register again".into(),
        });
    }
    // A poll-mode registration without a URL keeps the stored one (unchecked, unused).
    let url = url.or(row.url.clone());
    // Lazy heal: a workspace without an inbound secret gets one now.
    let secret = match row.platform_inbound_secret {
        Some(s) => s,
        None => tokens::mint_inbound_secret(),
    };
    // The registration's explicit version wins; then the card it carries; else unknown
    // until the dispatcher reads the agent's card.
    let (version, source) = match (body.a2a_version, body.agent_card.as_ref().and_then(card::version_of)) {
        (Some(v), _) => (Some(v), Some("registration")),
        (None, Some(v)) => (Some(v), Some("card")),
        (None, None) => (None, None),
    };
    let new_status: WorkspaceStatus = sqlx::query_scalar(
        "UPDATE workspaces SET delivery_mode = $2, url = $3, platform_inbound_secret = $4, last_heartbeat_at = now(), \
         a2a_version = $5, a2a_version_source = $6, \
         last_sample_error = CASE WHEN status IN ('provisioning', 'awaiting_agent') THEN NULL ELSE last_sample_error END, \
         status = CASE WHEN status IN ('provisioning', 'awaiting_agent') THEN 'online'::workspace_status ELSE status END, \
         updated_at = now() WHERE id = $1 RETURNING status",
    )
    .bind(ws)
    .bind(mode)
    .bind(&url)
    .bind(&secret)
    .bind(version)
    .bind(source)
    .fetch_one(&mut *tx)
    .await?;
    if new_status != row.status {
        record_event(&mut tx, p.org, ws, "WORKSPACE_ONLINE", serde_json::json!({ "from": row.status })).await?;
    }
    tx.commit().await?;
    tracing::info!(event = "registry.registered", workspace_id = %ws, org_id = %p.org, status = new_status.as_str());
    Ok(Json(Registered {
        workspace_id: ws,
        status: new_status,
        delivery_mode: mode,
        platform_inbound_secret: secret,
        a2a_version: version,
    }))
}

#[derive(sqlx::FromRow)]
struct RegistryRow {
    status: WorkspaceStatus,
    delivery_mode: DeliveryMode,
    url: Option<String>,
    assigned_url: Option<String>,
    platform_inbound_secret: Option<String>,
}

/// Writes a refused registration on the workspace: once per distinct reason (an agent
/// retrying every second adds no event), never on a removed one.
async fn note_refusal(st: &AppState, org: molecule_domain::OrgId, ws: Uuid, why: &str) -> ApiResult<()> {
    let message = format!("The agent's registration was refused: {why}.");
    let mut tx = st.db.begin().await?;
    let changed = sqlx::query(
        "UPDATE workspaces SET last_sample_error = $3, updated_at = now() \
         WHERE id = $1 AND org_id = $2 AND status <> 'removed' AND last_sample_error IS DISTINCT FROM $3",
    )
    .bind(ws)
    .bind(org.0)
    .bind(&message)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 1 {
        record_event(&mut tx, org, ws, "WORKSPACE_REGISTRATION_REFUSED", serde_json::json!({ "reason": why })).await?;
    }
    tx.commit().await?;
    tracing::info!(event = "registry.refused", workspace_id = %ws, org_id = %org, reason = why);
    Ok(())
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
