//! A16: liveness and readiness.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use std::time::Duration;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::ErrorBody;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` (healthz) or `ready` (readyz).
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// Readiness: the database answers and every migration is applied.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Health), (status = 503, description = "not ready", body = ErrorBody)))]
pub async fn readyz(State(st): State<AppState>) -> Result<Json<Health>, axum::response::Response> {
    use axum::response::IntoResponse;
    let not_ready = |why: String| {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(ErrorBody { error: "not_ready".into(), detail: why })).into_response()
    };
    match tokio::time::timeout(Duration::from_secs(2), molecule_domain::db::readiness(&st.db)).await {
        Ok(Ok(())) => Ok(Json(Health { status: "ready".into() })),
        Ok(Err(why)) => Err(not_ready(why)),
        Err(_) => Err(not_ready("database did not answer within 2 s".into())),
    }
}
