//! A12b: workspace tokens minted by an org token — how an agent running elsewhere
//! (`runtime: external`) gets the token it registers with.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use molecule_domain::tokens;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::parse_workspace_id;
use crate::routes::workspaces::record_event;

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct IssueToken {
    /// true: the workspace's other live tokens stay valid. Default false: they are revoked
    /// (rotation).
    #[serde(default)]
    pub keep_existing: bool,
}

#[derive(Serialize, ToSchema)]
pub struct IssuedToken {
    /// The new workspace token. Shown once: only its hash is stored.
    pub token: String,
    pub workspace_id: Uuid,
    /// How many earlier tokens this revoked.
    pub revoked: u64,
}

/// A12b: mint a workspace token (shown once). Rotation: the workspace's previous tokens
/// are revoked unless `keep_existing` is true — a running agent holding one of them is
/// refused from then on. The body is optional.
#[utoipa::path(post, path = "/workspaces/{id}/tokens", tag = "workspaces", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    request_body(content = Option<IssueToken>, content_type = "application/json"),
    responses(
        (status = 201, body = IssuedToken),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "a workspace token cannot mint tokens", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn issue(
    State(st): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<IssuedToken>)> {
    let ws = parse_workspace_id(&id)?;
    let org = p.require_org()?;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE { ApiError::PayloadTooLarge } else { ApiError::bad("invalid_body", r.body_text()) }
    })?;
    let args: IssueToken = if body.iter().all(u8::is_ascii_whitespace) {
        IssueToken::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad("invalid_body", format!("the body is not a valid token request: {e}")))?
    };
    let mut tx = st.db.begin().await?;
    // The row lock orders concurrent rotations: each revokes what the one before issued.
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM workspaces WHERE id = $1 AND org_id = $2 AND status <> 'removed' FOR UPDATE")
            .bind(ws.0)
            .bind(org.0)
            .fetch_optional(&mut *tx)
            .await?;
    found.ok_or(ApiError::NotFound("workspace"))?;
    let revoked = if args.keep_existing { 0 } else { tokens::revoke_workspace_tokens(&mut tx, ws).await? };
    let token = tokens::create_workspace_token(&mut tx, ws).await?;
    record_event(&mut tx, org, ws.0, "WORKSPACE_TOKEN_ISSUED", serde_json::json!({ "revoked": revoked })).await?;
    tx.commit().await?;
    tracing::info!(event = "workspace.token_issued", workspace_id = %ws, org_id = %org, revoked);
    Ok((StatusCode::CREATED, Json(IssuedToken { token, workspace_id: ws.0, revoked })))
}
