//! Extractors whose rejections speak our error shape (400/413/415), and id parsing.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// JSON body: syntax errors and unknown or mistyped fields → 400, no JSON content type →
/// 415, over the body limit → 413.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(json_rejection(r)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::UnsupportedMediaType("send the body as JSON with Content-Type: application/json".into())
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::bad("invalid_json", format!("the body is not valid JSON: {}", e.body_text())),
        JsonRejection::JsonDataError(e) => ApiError::bad("invalid_body", e.body_text()),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        other => ApiError::bad("invalid_body", other.body_text()),
    }
}

/// Query string: unknown or malformed parameters → 400.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => Err(ApiError::bad("invalid_query", e.body_text())),
            Err(e) => Err(ApiError::bad("invalid_query", e.body_text())),
        }
    }
}

pub fn parse_workspace_id(s: &str) -> Result<molecule_domain::WorkspaceId, ApiError> {
    s.parse().map_err(|_| ApiError::bad("invalid_id", "workspace ids are UUIDs"))
}

pub fn parse_job_id(s: &str) -> Result<molecule_domain::JobId, ApiError> {
    s.parse().map_err(|_| ApiError::bad("invalid_id", "job ids are ULIDs (26 characters, Crockford base32, upper case)"))
}
