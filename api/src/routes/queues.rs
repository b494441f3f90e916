//! A15: per-pool queue depth and workers, for operators (ADMIN_TOKEN).

use axum::Json;
use axum::extract::State;

use crate::AppState;
use crate::auth::Admin;
use crate::error::{ApiResult, ErrorBody};

pub use molecule_jobs::store::stats::QueueStats;

/// A15: every pool's depth, age of its oldest due job, and live workers.
#[utoipa::path(get, path = "/queues", tag = "operations", security(("admin" = [])),
    responses(
        (status = 200, body = Vec<QueueStats>),
        (status = 401, description = "missing or wrong ADMIN_TOKEN", body = ErrorBody),
        (status = 403, description = "ADMIN_TOKEN not configured", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn queues(State(st): State<AppState>, _admin: Admin) -> ApiResult<Json<Vec<QueueStats>>> {
    Ok(Json(molecule_jobs::store::stats::queue_stats(&st.db).await?))
}
