//! Dashboard sessions: a random secret in an HttpOnly cookie, its sha256 in
//! `dashboard_sessions`. This module owns that table.

use sqlx::PgConnection;
use std::time::Duration;
use uuid::Uuid;

use crate::OrgId;
use crate::tokens::hash;

pub const PREFIX: &str = "mol_sess_";
/// How long a session lasts from its login.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Who a session (or a bearer token) lets see the dashboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Viewer {
    /// ADMIN_TOKEN: every organization.
    Operator,
    /// An org token: its organization only.
    Org(OrgId),
}

impl Viewer {
    /// The organization it is limited to; None: every one.
    pub fn org(self) -> Option<OrgId> {
        match self {
            Viewer::Operator => None,
            Viewer::Org(o) => Some(o),
        }
    }
}

/// What a login was made with.
pub enum Login<'a> {
    /// With ADMIN_TOKEN (checked by the caller).
    Operator {
        admin_token: &'a str,
    },
    Org {
        org: OrgId,
        token_id: Uuid,
    },
}

/// What an operator session stores: a hash over its secret and ADMIN_TOKEN. It changes
/// with either, and a copy of the table alone (no cookie) gives nothing to guess
/// ADMIN_TOKEN against — unlike a plain hash of a token an operator chose.
fn admin_binding(secret: &str, admin_token: &str) -> [u8; 32] {
    hash(&format!("molecule-dashboard-operator\0{secret}\0{admin_token}"))
}

/// Opens a session; returns the secret to put in the cookie (shown once). Expired
/// sessions are removed on the way.
pub async fn open(conn: &mut PgConnection, login: Login<'_>) -> Result<String, sqlx::Error> {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf).expect("OS random number generator unavailable");
    let secret = format!("{PREFIX}{}", hex::encode(buf));
    let (org, token, binding) = match login {
        Login::Operator { admin_token } => (None, None, Some(admin_binding(&secret, admin_token).to_vec())),
        Login::Org { org, token_id } => (Some(org.0), Some(token_id), None),
    };
    sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at < now()").execute(&mut *conn).await?;
    sqlx::query(
        "INSERT INTO dashboard_sessions (secret_sha256, org_id, org_token_id, admin_binding, expires_at) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
    )
    .bind(&hash(&secret)[..])
    .bind(org)
    .bind(token)
    .bind(binding)
    .bind(LIFETIME.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(secret)
}

/// The session's viewer: None when unknown, expired, its org token revoked, or (for an
/// operator) ADMIN_TOKEN changed since or unset now (`admin_token`: the current one).
pub async fn lookup(conn: &mut PgConnection, secret: &str, admin_token: Option<&str>) -> Result<Option<Viewer>, sqlx::Error> {
    if !secret.starts_with(PREFIX) {
        return Ok(None);
    }
    let row: Option<(Option<Uuid>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT s.org_id, s.admin_binding FROM dashboard_sessions s \
         LEFT JOIN org_tokens t ON t.id = s.org_token_id \
         WHERE s.secret_sha256 = $1 AND s.expires_at > now() \
           AND (s.org_token_id IS NULL OR t.revoked_at IS NULL)",
    )
    .bind(&hash(secret)[..])
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some((Some(org), _)) => Some(Viewer::Org(OrgId(org))),
        Some((None, Some(stored))) => {
            let current = admin_token.is_some_and(|t| crate::tokens::constant_time_eq_bytes(&admin_binding(secret, t), &stored));
            current.then_some(Viewer::Operator)
        }
        _ => None,
    })
}

/// Logs a session out (unknown secrets: nothing to do).
pub async fn close(conn: &mut PgConnection, secret: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM dashboard_sessions WHERE secret_sha256 = $1").bind(&hash(secret)[..]).execute(conn).await?;
    Ok(())
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::fresh_db;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_end_with_their_token_their_admin_token_or_logout() {
        let (db, _) = fresh_db().await;
        let mut conn = db.acquire().await.unwrap();
        let (org, first) = crate::tokens::create_org(&mut conn, "acme").await.unwrap();
        let Some(crate::tokens::TokenOwner::Org { token_id, .. }) = crate::tokens::lookup(&mut conn, &first).await.unwrap() else {
            panic!("the org token authenticates");
        };
        let s = open(&mut conn, Login::Org { org, token_id }).await.unwrap();
        assert_eq!(lookup(&mut conn, &s, None).await.unwrap(), Some(Viewer::Org(org)));
        assert_eq!(lookup(&mut conn, "mol_sess_00", None).await.unwrap(), None, "an unknown secret is nobody");
        assert!(crate::tokens::revoke_org_token(&mut conn, org, token_id).await.unwrap());
        assert_eq!(lookup(&mut conn, &s, None).await.unwrap(), None, "revoking the token ends its sessions");

        let admin = "the admin token";
        let op = open(&mut conn, Login::Operator { admin_token: admin }).await.unwrap();
        assert_eq!(lookup(&mut conn, &op, Some(admin)).await.unwrap(), Some(Viewer::Operator));
        assert_eq!(lookup(&mut conn, &op, Some("a new admin token")).await.unwrap(), None, "a new ADMIN_TOKEN ends operator sessions");
        assert_eq!(lookup(&mut conn, &op, None).await.unwrap(), None);
        let stored: Vec<u8> =
            sqlx::query_scalar("SELECT admin_binding FROM dashboard_sessions WHERE org_id IS NULL").fetch_one(&mut *conn).await.unwrap();
        assert_ne!(stored, hash(admin).to_vec(), "the table does not hold a plain hash of ADMIN_TOKEN");
        close(&mut conn, &op).await.unwrap();
        assert_eq!(lookup(&mut conn, &op, Some(admin)).await.unwrap(), None, "logout ends it");

        sqlx::query("UPDATE dashboard_sessions SET expires_at = now() - interval '1 second'").execute(&mut *conn).await.unwrap();
        let fresh = open(&mut conn, Login::Operator { admin_token: admin }).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dashboard_sessions").fetch_one(&mut *conn).await.unwrap();
        assert_eq!(left, 1, "a login clears expired sessions");
        assert_eq!(lookup(&mut conn, &fresh, Some(admin)).await.unwrap(), Some(Viewer::Operator));
    }
}
