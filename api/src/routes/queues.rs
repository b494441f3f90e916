//! A15: per-pool queue depth and workers, for operators (ADMIN_TOKEN) and, of their own
//! jobs, organizations (an org token).

use axum::Json;
use axum::extract::State;

use crate::AppState;
use crate::auth::OperatorOrOrg;
use crate::error::{ApiResult, ErrorBody};

pub use molecule_jobs::store::stats::QueueStats;

/// A15: every pool's depth, age of its oldest due job, and live workers. With an org
/// token: the org's own jobs' depths and ages; the pools' workers are the platform's and
/// read 0, as on the dashboard.
#[utoipa::path(get, path = "/queues", tag = "operations", security(("admin" = []), ("bearer" = [])),
    responses(
        (status = 200, body = Vec<QueueStats>),
        (status = 401, description = "missing or unknown token", body = ErrorBody),
        (status = 403, description = "a workspace token, or no token while ADMIN_TOKEN is not configured", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn queues(State(st): State<AppState>, OperatorOrOrg(who): OperatorOrOrg) -> ApiResult<Json<Vec<QueueStats>>> {
    Ok(Json(molecule_jobs::store::stats::queue_stats_of(&st.db, who.org()).await?))
}
