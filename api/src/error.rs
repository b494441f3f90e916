//! The API's one error type and its one mapping to HTTP: `{"error": code, "detail": sentence}`.
//! Internals (SQL, hosts, tokens) never reach a response; they are logged, without secrets.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    /// A cursor that no longer (or never did) point at a row the caller may read.
    #[error("{0}")]
    Gone(&'static str),
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{detail}")]
    TooManyRequests { code: &'static str, detail: String },
    #[error("{0}")]
    NotImplemented(String),
    #[error("platform misconfigured")]
    PlatformMisconfigured,
    #[error("database unavailable")]
    Unavailable,
    /// A statement gave up waiting for a lock (SQLSTATE 55P03: `lock_timeout`, which the
    /// enqueuing routes' batches set, [`crate::batch::LOCK_WAIT`]).
    #[error("busy")]
    Busy,
    #[error("internal error")]
    Internal,
}

/// The body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `not_found`, `invalid_body`, `platform_misconfigured`.
    pub error: String,
    /// A sentence for humans.
    pub detail: String,
}

impl ApiError {
    pub fn bad(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest { code, detail: detail.into() }
    }

    pub(crate) fn parts(&self) -> (StatusCode, &'static str, String) {
        use ApiError::*;
        match self {
            BadRequest { code, detail } => (StatusCode::BAD_REQUEST, code, detail.clone()),
            Unauthorized(d) => (StatusCode::UNAUTHORIZED, "unauthorized", d.to_string()),
            Forbidden(d) => (StatusCode::FORBIDDEN, "forbidden", d.clone()),
            NotFound(what) => (StatusCode::NOT_FOUND, "not_found", format!("{what} not found")),
            Conflict { code, detail } => (StatusCode::CONFLICT, code, detail.clone()),
            Gone(d) => (StatusCode::GONE, "cursor_gone", d.to_string()),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the request body is over the size limit".into()),
            UnsupportedMediaType(d) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", d.clone()),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method".into()),
            TooManyRequests { code, detail } => (StatusCode::TOO_MANY_REQUESTS, code, detail.clone()),
            NotImplemented(d) => (StatusCode::NOT_IMPLEMENTED, "not_implemented", d.clone()),
            PlatformMisconfigured => (
                StatusCode::SERVICE_UNAVAILABLE,
                "platform_misconfigured",
                "this server has no organization configured (MOLECULE_ORG_ID is set but empty); refusing to serve tenant data".into(),
            ),
            Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", "the database is not reachable; retry shortly".into()),
            Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the database is busy (a lock wait timed out or was cut short); retry shortly".into(),
            ),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "an internal error occurred; it has been logged".into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, detail) = self.parts();
        (status, Json(ErrorBody { error: code.into(), detail })).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::Unavailable
            }
            sqlx::Error::Database(db) if molecule_domain::db::is_outage(db.as_ref()) => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::Unavailable
            }
            // Routes check the text they know of; this catches any other (a query filter, a
            // field nested deep in a body).
            sqlx::Error::Database(db) if molecule_domain::db::refused_nul(db.as_ref()) => {
                ApiError::bad("invalid_text", "a text value contains a NUL character (\\u0000), which cannot be stored")
            }
            sqlx::Error::Database(db) if molecule_domain::db::gave_up_on_lock(db.as_ref()) => {
                tracing::warn!(error = %e, "gave up waiting for a lock");
                ApiError::Busy
            }
            // E.g. a delete locking a tree that grew while a create batch took its parents.
            sqlx::Error::Database(db) if molecule_domain::db::deadlock_victim(db.as_ref()) => {
                tracing::warn!(error = %e, "deadlock victim");
                ApiError::Busy
            }
            _ => {
                tracing::error!(error = %e, "database error");
                ApiError::Internal
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
