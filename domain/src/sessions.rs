//! Dashboard sessions: a random secret in an HttpOnly cookie, its sha256 in
//! `dashboard_sessions`. This module owns that table.

use sqlx::PgConnection;
use std::time::Duration;
use uuid::Uuid;

use crate::tokens::hash;
use crate::OrgId;

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

/// What a login was made with.
pub enum Login {
    Operator { admin_fingerprint: [u8; 32] },
    Org { org: OrgId, token_id: Uuid },
}

/// Opens a session; returns the secret to put in the cookie (shown once). Expired
/// sessions are removed on the way.
pub async fn open(conn: &mut PgConnection, login: Login) -> Result<String, sqlx::Error> {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf).expect("OS random number generator unavailable");
    let secret = format!("{PREFIX}{}", hex::encode(buf));
    let (org, token, fingerprint) = match login {
        Login::Operator { admin_fingerprint } => (None, None, Some(admin_fingerprint.to_vec())),
        Login::Org { org, token_id } => (Some(org.0), Some(token_id), None),
    };
    sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at < now()").execute(&mut *conn).await?;
    sqlx::query(
        "INSERT INTO dashboard_sessions (secret_sha256, org_id, org_token_id, admin_fingerprint, expires_at) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
    )
    .bind(&hash(&secret)[..])
    .bind(org)
    .bind(token)
    .bind(fingerprint)
    .bind(LIFETIME.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(secret)
}

/// The session's viewer: None when unknown, expired, its org token revoked, or (for an
/// operator) ADMIN_TOKEN changed since — `admin_fingerprint` is the current one's hash.
pub async fn lookup(conn: &mut PgConnection, secret: &str, admin_fingerprint: Option<[u8; 32]>) -> Result<Option<Viewer>, sqlx::Error> {
    if !secret.starts_with(PREFIX) {
        return Ok(None);
    }
    let row: Option<(Option<Uuid>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT s.org_id, s.admin_fingerprint FROM dashboard_sessions s \
         LEFT JOIN org_tokens t ON t.id = s.org_token_id \
         WHERE s.secret_sha256 = $1 AND s.expires_at > now() \
           AND (s.org_token_id IS NULL OR t.revoked_at IS NULL)",
    )
    .bind(&hash(secret)[..])
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        Some((Some(org), _)) => Some(Viewer::Org(OrgId(org))),
        Some((None, Some(fp))) => {
            let current = admin_fingerprint.map(|f| crate::tokens::constant_time_eq_bytes(&f, &fp)).unwrap_or(false);
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

        let admin = hash("the admin token");
        let op = open(&mut conn, Login::Operator { admin_fingerprint: admin }).await.unwrap();
        assert_eq!(lookup(&mut conn, &op, Some(admin)).await.unwrap(), Some(Viewer::Operator));
        assert_eq!(lookup(&mut conn, &op, Some(hash("a new admin token"))).await.unwrap(), None, "a new ADMIN_TOKEN ends operator sessions");
        assert_eq!(lookup(&mut conn, &op, None).await.unwrap(), None);
        close(&mut conn, &op).await.unwrap();
        assert_eq!(lookup(&mut conn, &op, Some(admin)).await.unwrap(), None, "logout ends it");

        sqlx::query("UPDATE dashboard_sessions SET expires_at = now() - interval '1 second'").execute(&mut *conn).await.unwrap();
        let fresh = open(&mut conn, Login::Operator { admin_fingerprint: admin }).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dashboard_sessions").fetch_one(&mut *conn).await.unwrap();
        assert_eq!(left, 1, "a login clears expired sessions");
        assert_eq!(lookup(&mut conn, &fresh, Some(admin)).await.unwrap(), Some(Viewer::Operator));
    }
}
