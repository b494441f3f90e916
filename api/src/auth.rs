//! Who is calling (X1, X2). Org tokens (canvas, operators), workspace tokens (agents) and
//! ADMIN_TOKEN (`/admin/*` and operator routes). Every token goes through the one lookup
//! predicate of `molecule_domain::tokens`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use molecule_domain::sessions::Viewer;
use molecule_domain::tokens::{self, TokenOwner};
use molecule_domain::{OrgId, WorkspaceId};

use crate::AppState;
use crate::batch::{self, Batcher};
use crate::error::{ApiError, ApiResult};

/// How this process is bound to organizations (MOLECULE_ORG_ID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrgPin {
    /// Unset: any org's tokens are served, each scoped to its own org.
    Any,
    /// Only this org's tokens are accepted.
    Only(OrgId),
    /// Set but empty: fail closed on every tenant route, before any query (seed 000).
    Misconfigured,
}

impl OrgPin {
    pub fn from_env_value(v: Option<&str>) -> Result<OrgPin, String> {
        match v {
            None => Ok(OrgPin::Any),
            Some(s) if s.trim().is_empty() => Ok(OrgPin::Misconfigured),
            Some(s) => s.trim().parse().map(OrgPin::Only).map_err(|_| "MOLECULE_ORG_ID must be an organization id (a UUID)".to_string()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub admin_token: Option<String>,
    /// MOLECULE_DEV=1: admin routes open without a token.
    pub dev: bool,
    pub org_pin: OrgPin,
    /// Agent URLs on loopback are accepted (dev mode, or MOLECULE_ALLOW_LOOPBACK_AGENTS=1
    /// for local installs and tests). Private and metadata addresses never are.
    pub allow_loopback_agents: bool,
}

/// An authenticated tenant caller. `org` is never empty: an org pin misconfiguration
/// fails the request before any token lookup.
#[derive(Clone, Copy, Debug)]
pub struct Principal {
    pub org: OrgId,
    /// Some for a workspace token: the caller may only touch that workspace.
    pub workspace: Option<WorkspaceId>,
}

impl Principal {
    /// Org tokens only (creating and deleting workspaces, job control).
    pub fn require_org(&self) -> Result<OrgId, ApiError> {
        match self.workspace {
            None => Ok(self.org),
            Some(_) => Err(ApiError::Forbidden("this route needs an organization token, not a workspace token".into())),
        }
    }

    /// A workspace token reaches only its own workspace: anything else reads as absent.
    pub fn may_see(&self, ws: WorkspaceId) -> bool {
        self.workspace.is_none_or(|own| own == ws)
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    bearer_of(&parts.headers)
}

/// The token of an `Authorization: Bearer …` header.
pub(crate) fn bearer_of(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        if st.auth.org_pin == OrgPin::Misconfigured {
            return Err(ApiError::PlatformMisconfigured);
        }
        let token = bearer(parts).ok_or(ApiError::Unauthorized("missing bearer token"))?;
        let invalid = || ApiError::Unauthorized("invalid or revoked token");
        let key = tokens::lookup_key(token).ok_or_else(invalid)?;
        let owner = st.tokens.submit(key).await.ok_or(ApiError::Internal)??.ok_or_else(invalid)?;
        let p = match owner {
            TokenOwner::Org { org_id, .. } => Principal { org: org_id, workspace: None },
            TokenOwner::Workspace { workspace_id, org_id, .. } => Principal { org: org_id, workspace: Some(workspace_id) },
        };
        if let OrgPin::Only(pinned) = st.auth.org_pin {
            if p.org != pinned {
                return Err(ApiError::Unauthorized("this token belongs to an organization this server does not serve"));
            }
        }
        Ok(p)
    }
}

pub type TokenBatcher = Batcher<[u8; 32], ApiResult<Option<TokenOwner>>>;

/// The lanes looking tokens up (crate::batch): the callers waiting meanwhile share a statement.
pub fn token_batcher(db: sqlx::PgPool) -> TokenBatcher {
    Batcher::start(batch::lanes(), batch::MAX, move |keys: Vec<[u8; 32]>| {
        let db = db.clone();
        // One statement reads them all: nothing in it is one key's fault, so no key runs alone.
        async move { look_up(&db, &keys).await.unwrap_or_else(|e| batch::every_caller(&keys, e)) }
    })
}

async fn look_up(db: &sqlx::PgPool, keys: &[[u8; 32]]) -> Result<Vec<ApiResult<Option<TokenOwner>>>, sqlx::Error> {
    let mut conn = db.acquire().await?;
    Ok(tokens::lookup_keys(&mut conn, keys).await?.into_iter().map(Ok).collect())
}

/// The operator: ADMIN_TOKEN, compared in constant time. No ADMIN_TOKEN configured →
/// refused (403), unless the server runs in explicit dev mode.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        match (&st.auth.admin_token, st.auth.dev) {
            (None, true) => Ok(Admin),
            (None, false) => Err(ApiError::Forbidden("admin routes are disabled: ADMIN_TOKEN is not configured".into())),
            (Some(expected), _) => {
                let given = bearer(parts).ok_or(ApiError::Unauthorized("missing bearer token"))?;
                if tokens::constant_time_eq(given, expected) { Ok(Admin) } else { Err(ApiError::Unauthorized("invalid admin token")) }
            }
        }
    }
}

/// A reader of operator figures that an organization may read about itself (A15
/// `GET /queues`), as the dashboard's viewers are: the operator ([`Admin`]) sees every
/// org's jobs, an org token its own. A workspace token is refused (403).
pub struct OperatorOrOrg(pub Viewer);

impl FromRequestParts<AppState> for OperatorOrOrg {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        match (bearer(parts), &st.auth.admin_token) {
            (Some(given), Some(admin)) if tokens::constant_time_eq(given, admin) => Ok(OperatorOrOrg(Viewer::Operator)),
            // No bearer: the operator's rules decide (dev mode without ADMIN_TOKEN: open).
            (None, _) => Admin::from_request_parts(parts, st).await.map(|_| OperatorOrOrg(Viewer::Operator)),
            (Some(_), _) => Ok(OperatorOrOrg(Viewer::Org(Principal::from_request_parts(parts, st).await?.require_org()?))),
        }
    }
}
