//! `/dashboard`: queues, jobs, workers and workspaces, server-rendered (no script), behind
//! auth. ADMIN_TOKEN sees every organization, an org token its own. A browser logs in
//! once (`/dashboard/login` sets an HttpOnly session cookie, `domain::sessions`); scripts
//! send `Authorization: Bearer`. Without either: 303 to the login page (401 for a wrong
//! bearer). Why not apalis-board: see the README ("The dashboard").

mod pages;

pub use pages::esc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use molecule_domain::JobId;
use molecule_domain::sessions::{self, Login, Viewer};
use molecule_domain::tokens::{self, TokenOwner};
use molecule_jobs::status::{self, JobScope, JobStatus, ListFilter};
use serde::Deserialize;

use crate::AppState;
use crate::auth::OrgPin;
use crate::error::ApiError;

pub const COOKIE: &str = "molecule_session";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(overview))
        .route("/dashboard/jobs", get(jobs))
        .route("/dashboard/jobs/{id}", get(job))
        .route("/dashboard/workspaces", get(workspaces))
        .route("/dashboard/login", get(login_form).post(login))
        .route("/dashboard/logout", post(logout))
}

/// Who is looking. The rejection is a response: the login page's redirect, or a 401.
pub struct Seen(pub Viewer);

impl FromRequestParts<AppState> for Seen {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Response> {
        if let Some(token) = crate::auth::bearer_of(&parts.headers) {
            return match viewer_of_token(st, token).await {
                Ok(Some((v, _))) => Ok(Seen(v)),
                Ok(None) => Err(page_error(ApiError::Unauthorized("invalid or revoked token"))),
                Err(e) => Err(page_error(e)),
            };
        }
        if let Some(secret) = cookie(&parts.headers, COOKIE) {
            let mut conn = st.db.acquire().await.map_err(|e| page_error(e.into()))?;
            match sessions::lookup(&mut conn, secret, st.auth.admin_token.as_deref()).await {
                Ok(Some(v)) if pinned_ok(st, v) => return Ok(Seen(v)),
                Ok(_) => {}
                Err(e) => return Err(page_error(e.into())),
            }
        }
        if st.auth.admin_token.is_none() && st.auth.dev {
            // Explicit dev mode without ADMIN_TOKEN opens operator routes; this is one.
            return Ok(Seen(Viewer::Operator));
        }
        Err(Redirect::to("/dashboard/login").into_response())
    }
}

fn pinned_ok(st: &AppState, v: Viewer) -> bool {
    match (v, &st.auth.org_pin) {
        (Viewer::Org(org), OrgPin::Only(pinned)) => org == *pinned,
        (Viewer::Org(_), OrgPin::Misconfigured) => false,
        _ => true,
    }
}

/// ADMIN_TOKEN → the operator; an org token → its org (with the token's id, for the
/// session); anything else (a workspace token included) → None.
async fn viewer_of_token<'a>(st: &'a AppState, token: &str) -> Result<Option<(Viewer, Login<'a>)>, ApiError> {
    if let Some(admin) = &st.auth.admin_token {
        if tokens::constant_time_eq(token, admin) {
            return Ok(Some((Viewer::Operator, Login::Operator { admin_token: admin })));
        }
    }
    let mut conn = st.db.acquire().await?;
    Ok(match tokens::lookup(&mut conn, token).await? {
        Some(TokenOwner::Org { org_id, token_id }) if pinned_ok(st, Viewer::Org(org_id)) => {
            Some((Viewer::Org(org_id), Login::Org { org: org_id, token_id }))
        }
        _ => None,
    })
}

fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Pages never cached, never framed, no script at all.
fn html(status: StatusCode, body: String) -> Response {
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    // Not `no-referrer`: under it browsers post forms with `Origin: null`, which the
    // same-origin check below refuses.
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
    );
    res
}

fn page_error(e: ApiError) -> Response {
    let (status, code, detail) = e.parts();
    html(status, pages::error(status.as_u16(), code, &detail))
}

async fn overview(State(st): State<AppState>, Seen(v): Seen) -> Response {
    let org = v.org();
    let stats = match molecule_jobs::store::stats::queue_stats_of(&st.db, org).await {
        Ok(s) => s,
        Err(e) => return page_error(e.into()),
    };
    let workers = match v {
        Viewer::Operator => match molecule_jobs::store::workers::alive(&st.db).await {
            Ok(w) => Some(w),
            Err(e) => return page_error(e.into()),
        },
        Viewer::Org(_) => None,
    };
    html(StatusCode::OK, pages::overview(v, &stats, workers.as_deref()))
}

#[derive(Deserialize, Default)]
pub struct JobsQuery {
    status: Option<String>,
    queue: Option<String>,
    before: Option<String>,
}

const PAGE: i64 = 50;

async fn jobs(State(st): State<AppState>, Seen(v): Seen, Query(q): Query<JobsQuery>) -> Response {
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match JobStatus::parse(s) {
            Some(s) => Some(s),
            None => return page_error(ApiError::bad("invalid_status", format!("unknown job status {s:?}"))),
        },
    };
    let before = match q.before.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => match b.parse::<JobId>() {
            Ok(id) => Some(id),
            Err(_) => return page_error(ApiError::bad("invalid_cursor", "not a job id")),
        },
    };
    let kind = q.queue.filter(|s| !s.is_empty());
    let scope = match v {
        Viewer::Operator => JobScope::AllOrgs,
        Viewer::Org(o) => JobScope::Org(o),
    };
    let filter = ListFilter { scope, workspace: None, kind: kind.clone(), status, before, limit: PAGE + 1 };
    let mut rows = match status::list(&st.db, &filter).await {
        Ok(r) => r,
        Err(e) => return page_error(e.into()),
    };
    let more = rows.len() as i64 > PAGE;
    rows.truncate(PAGE as usize);
    let next = more.then(|| rows.last().map(|j| j.id.clone())).flatten();
    html(StatusCode::OK, pages::jobs(v, &rows, status, kind.as_deref(), next.as_deref()))
}

async fn job(State(st): State<AppState>, Seen(v): Seen, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<JobId>() else {
        return page_error(ApiError::NotFound("job"));
    };
    let found = match v {
        Viewer::Operator => status::get(&st.db, &id).await,
        Viewer::Org(org) => status::get_for_org(&st.db, &id, org).await,
    };
    let job = match found {
        Ok(Some(j)) => j,
        Ok(None) => return page_error(ApiError::NotFound("job")),
        Err(e) => return page_error(e.into()),
    };
    // The failure's detail is for operators only (tenants read the code and sentence).
    let detail = match v {
        Viewer::Operator => match status::error_detail(&st.db, &id).await {
            Ok(d) => d,
            Err(e) => return page_error(e.into()),
        },
        Viewer::Org(_) => None,
    };
    html(StatusCode::OK, pages::job(v, &job, detail.as_deref()))
}

async fn workspaces(State(st): State<AppState>, Seen(v): Seen) -> Response {
    match crate::routes::workspaces::recent(&st.db, v.org(), 200).await {
        Ok(ws) => html(StatusCode::OK, pages::workspaces(v, &ws)),
        Err(e) => page_error(e.into()),
    }
}

async fn login_form() -> Response {
    html(StatusCode::OK, pages::login(None))
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

/// A token in a form (never in a URL), checked like a bearer; a session in return.
async fn login(State(st): State<AppState>, headers: HeaderMap, Form(f): Form<LoginForm>) -> Response {
    if let Err(r) = same_origin(&headers) {
        return r;
    }
    let (_, login) = match viewer_of_token(&st, f.token.trim()).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            return html(
                StatusCode::UNAUTHORIZED,
                pages::login(Some("That token is not valid here (an organization token or ADMIN_TOKEN).")),
            );
        }
        Err(e) => return page_error(e),
    };
    let secret = match st.db.acquire().await {
        Ok(mut conn) => match sessions::open(&mut conn, login).await {
            Ok(s) => s,
            Err(e) => return page_error(e.into()),
        },
        Err(e) => return page_error(e.into()),
    };
    let secure = if forwarded_https(&headers) { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={secret}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}{secure}", sessions::LIFETIME.as_secs());
    let mut res = Redirect::to("/dashboard").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

async fn logout(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = same_origin(&headers) {
        return r;
    }
    if let Some(secret) = cookie(&headers, COOKIE) {
        match st.db.acquire().await {
            Ok(mut conn) => {
                if let Err(e) = sessions::close(&mut conn, secret).await {
                    return page_error(e.into());
                }
            }
            Err(e) => return page_error(e.into()),
        }
    }
    let mut res = Redirect::to("/dashboard/login").into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_static("molecule_session=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0"));
    res
}

/// A form posted from another site is refused (the cookie is SameSite=Strict too): a POST
/// must name this host as its `Origin`, or come with `Sec-Fetch-Site: same-origin`.
/// Browsers send one or both; a request with neither is not from our form.
fn same_origin(h: &HeaderMap) -> Result<(), Response> {
    let text = |name| h.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let origin_ok = match (text(header::ORIGIN), text(header::HOST)) {
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host)),
        _ => false,
    };
    if origin_ok || text(header::HeaderName::from_static("sec-fetch-site")) == Some("same-origin") {
        Ok(())
    } else {
        Err(page_error(ApiError::Forbidden("a dashboard form must be posted from the dashboard".into())))
    }
}

fn forwarded_https(h: &HeaderMap) -> bool {
    h.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; molecule_session_x=no; molecule_session=yes"));
        assert_eq!(cookie(&h, COOKIE), Some("yes"));
        assert_eq!(cookie(&h, "b"), None);
    }

    #[test]
    fn a_post_from_another_origin_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert_eq!(same_origin(&h).unwrap_err().status(), StatusCode::FORBIDDEN);
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(same_origin(&h).is_err());
        h.remove(header::ORIGIN);
        assert!(same_origin(&h).is_err(), "neither Origin nor Sec-Fetch-Site: not our form");
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h).is_ok());
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&h).is_err());
    }
}
