//! Bearer tokens: minted random, shown once, stored only as a sha256 hash (X2).
//!
//! Formats: `mol_org_<64 hex>` (organization tokens) and `mol_ws_<64 hex>` (workspace
//! tokens). The prefix says what a token is without revealing anything of it; logs and
//! errors never carry any part of a token.

use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::{OrgId, WorkspaceId};

pub const ORG_PREFIX: &str = "mol_org_";
pub const WORKSPACE_PREFIX: &str = "mol_ws_";

/// A freshly minted token: the secret (to show once) and its hash (to store).
pub struct Minted {
    pub secret: String,
    pub sha256: [u8; 32],
}

fn mint(prefix: &str) -> Minted {
    let mut buf = [0u8; 32];
    // The OS generator does not fail on Linux once booted; if it ever did, refusing
    // to mint is the only safe answer.
    getrandom::getrandom(&mut buf).expect("OS random number generator unavailable");
    let secret = format!("{prefix}{}", hex::encode(buf));
    let sha256 = hash(&secret);
    Minted { secret, sha256 }
}

pub fn mint_org_token() -> Minted {
    mint(ORG_PREFIX)
}

pub fn mint_workspace_token() -> Minted {
    mint(WORKSPACE_PREFIX)
}

pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Constant-time equality of two digests.
pub fn constant_time_eq_bytes(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Constant-time equality (for ADMIN_TOKEN).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    // Compare hashes so the length of the secret does not leak through timing either.
    hash(a).ct_eq(&hash(b)).into()
}

/// Who a bearer token authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOwner {
    Org { org_id: OrgId, token_id: Uuid },
    Workspace { workspace_id: WorkspaceId, org_id: OrgId, token_id: Uuid },
}

/// The ONE predicate every token check goes through (seed 003: three copies of it once
/// drifted). A token authenticates when it is not revoked, and — for a workspace token —
/// when its workspace is not `removed`. Many callers' keys in one statement, each looked
/// up LATERAL by equality on its table's unique index: `token_sha256 = ANY($1)` let a
/// generic plan made while the tables were nearly empty read every live workspace token
/// through the partial `revoked_at IS NULL` index instead (20k tokens: 1.7 ms a lookup
/// against 0.03).
const LOOKUP_TOKENS: &str = r#"
SELECT k.key AS token_sha256, o.kind, o.id, o.org_id, o.workspace_id
FROM unnest($1::bytea[]) AS k(key)
CROSS JOIN LATERAL (
    SELECT 'org' AS kind, t.id, t.org_id, NULL::uuid AS workspace_id
    FROM org_tokens t
    WHERE t.token_sha256 = k.key AND t.revoked_at IS NULL
    UNION ALL
    SELECT 'workspace', t.id, w.org_id, w.id
    FROM workspace_auth_tokens t
    JOIN workspaces w ON w.id = t.workspace_id
    WHERE t.token_sha256 = k.key AND t.revoked_at IS NULL AND w.status <> 'removed'
    LIMIT 1
) AS o
"#;

/// What a secret is looked up by: its hash, or None when it cannot be a token at all.
pub fn lookup_key(secret: &str) -> Option<[u8; 32]> {
    (secret.starts_with(ORG_PREFIX) || secret.starts_with(WORKSPACE_PREFIX)).then(|| hash(secret))
}

pub async fn lookup(conn: &mut PgConnection, secret: &str) -> Result<Option<TokenOwner>, sqlx::Error> {
    match lookup_key(secret) {
        None => Ok(None),
        Some(key) => Ok(lookup_keys(conn, &[key]).await?.pop().flatten()),
    }
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    token_sha256: Vec<u8>,
    kind: String,
    id: Uuid,
    org_id: Uuid,
    workspace_id: Option<Uuid>,
}

/// Who each key's token authenticates, in order (many callers' lookups in one statement).
pub async fn lookup_keys(conn: &mut PgConnection, keys: &[[u8; 32]]) -> Result<Vec<Option<TokenOwner>>, sqlx::Error> {
    let rows: Vec<TokenRow> = sqlx::query_as(LOOKUP_TOKENS).bind(keys.iter().map(|k| &k[..]).collect::<Vec<_>>()).fetch_all(conn).await?;
    let owners: std::collections::HashMap<Vec<u8>, TokenOwner> = rows
        .into_iter()
        .filter_map(|r| {
            let owner = match (r.kind.as_str(), r.workspace_id) {
                ("org", _) => TokenOwner::Org { org_id: OrgId(r.org_id), token_id: r.id },
                ("workspace", Some(ws)) => TokenOwner::Workspace { workspace_id: WorkspaceId(ws), org_id: OrgId(r.org_id), token_id: r.id },
                _ => return None,
            };
            Some((r.token_sha256, owner))
        })
        .collect();
    Ok(keys.iter().map(|k| owners.get(&k[..]).copied()).collect())
}

/// Creates an organization and its first token; returns (org id, token secret).
pub async fn create_org(conn: &mut PgConnection, name: &str) -> Result<(OrgId, String), sqlx::Error> {
    let org: Uuid =
        sqlx::query_scalar("INSERT INTO organizations (name) VALUES ($1) RETURNING id").bind(name).fetch_one(&mut *conn).await?;
    let (_, secret) = create_org_token(conn, OrgId(org), None).await?;
    Ok((OrgId(org), secret))
}

/// Adds a token to an org; returns (token id, secret).
pub async fn create_org_token(conn: &mut PgConnection, org: OrgId, label: Option<&str>) -> Result<(Uuid, String), sqlx::Error> {
    let m = mint_org_token();
    let id: Uuid = sqlx::query_scalar("INSERT INTO org_tokens (org_id, token_sha256, label) VALUES ($1, $2, $3) RETURNING id")
        .bind(org.0)
        .bind(&m.sha256[..])
        .bind(label)
        .fetch_one(conn)
        .await?;
    Ok((id, m.secret))
}

/// Revokes an org token by id (within its org). True when a live token was revoked.
pub async fn revoke_org_token(conn: &mut PgConnection, org: OrgId, token_id: Uuid) -> Result<bool, sqlx::Error> {
    let n = sqlx::query("UPDATE org_tokens SET revoked_at = now() WHERE id = $1 AND org_id = $2 AND revoked_at IS NULL")
        .bind(token_id)
        .bind(org.0)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Revokes every live token of a workspace; returns how many.
pub async fn revoke_workspace_tokens(conn: &mut PgConnection, ws: WorkspaceId) -> Result<u64, sqlx::Error> {
    revoke_tokens_of(conn, &[ws.0]).await
}

/// Revokes every live token of these workspaces (a deleted tree); returns how many.
pub async fn revoke_tokens_of(conn: &mut PgConnection, workspaces: &[Uuid]) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("UPDATE workspace_auth_tokens SET revoked_at = now() WHERE workspace_id = ANY($1) AND revoked_at IS NULL")
        .bind(workspaces)
        .execute(conn)
        .await?
        .rows_affected())
}

/// Issues a workspace token (stored hashed); returns the secret.
pub async fn create_workspace_token(conn: &mut PgConnection, ws: WorkspaceId) -> Result<String, sqlx::Error> {
    let m = mint_workspace_token();
    sqlx::query("INSERT INTO workspace_auth_tokens (workspace_id, token_sha256) VALUES ($1, $2)")
        .bind(ws.0)
        .bind(&m.sha256[..])
        .execute(conn)
        .await?;
    Ok(m.secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_distinct_prefixed_and_hash_stably() {
        let a = mint_org_token();
        let b = mint_org_token();
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with(ORG_PREFIX) && a.secret.len() == ORG_PREFIX.len() + 64);
        assert_eq!(hash(&a.secret), a.sha256);
        assert!(mint_workspace_token().secret.starts_with(WORKSPACE_PREFIX));
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq("s3cret", "s3cret"));
        assert!(!constant_time_eq("s3cret", "s3cres"));
        assert!(!constant_time_eq("s3cret", "s3cret-longer"));
        assert!(!constant_time_eq("", "x"));
    }
}

/// Both secrets a workspace starts with. Its fields are private and it is only made by
/// [`mint_workspace_secrets`]: a backend cannot be handed a workspace to start without
/// them (seed 003: a provision path once skipped the mint).
pub struct MintedSecrets {
    token: String,
    inbound_secret: String,
}

impl MintedSecrets {
    /// The workspace's bearer token for the platform (A12).
    pub fn token(&self) -> &str {
        &self.token
    }
    /// What the platform presents to the workspace's agent (J6).
    pub fn inbound_secret(&self) -> &str {
        &self.inbound_secret
    }
    /// Fixed secrets for unit tests of what carries them (never minted, never stored).
    #[cfg(feature = "testing")]
    pub fn for_tests(token: &str, inbound_secret: &str) -> Self {
        MintedSecrets { token: token.into(), inbound_secret: inbound_secret.into() }
    }
}

impl std::fmt::Debug for MintedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MintedSecrets { .. }")
    }
}

pub const INBOUND_PREFIX: &str = "mol_pis_";

/// A fresh platform inbound secret (stored as is: the platform must present it).
pub fn mint_inbound_secret() -> String {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf).expect("OS random number generator unavailable");
    format!("{INBOUND_PREFIX}{}", hex::encode(buf))
}

/// THE one function every provision path (create, restart, child workspaces) uses to
/// mint a workspace's secrets: revokes its live tokens, issues a new one, and sets a new
/// platform inbound secret. Run it in the transaction that records the provision.
pub async fn mint_workspace_secrets(conn: &mut PgConnection, ws: WorkspaceId) -> Result<MintedSecrets, sqlx::Error> {
    revoke_workspace_tokens(&mut *conn, ws).await?;
    let token = create_workspace_token(&mut *conn, ws).await?;
    let inbound_secret = mint_inbound_secret();
    sqlx::query("UPDATE workspaces SET platform_inbound_secret = $2, updated_at = now() WHERE id = $1")
        .bind(ws.0)
        .bind(&inbound_secret)
        .execute(&mut *conn)
        .await?;
    Ok(MintedSecrets { token, inbound_secret })
}

#[cfg(all(test, feature = "testing"))]
mod db_tests {
    use super::*;

    /// A session that prepared the lookup while the tables were empty still finds each
    /// token through its unique index once there are thousands (a generic plan is kept
    /// until statistics change; nothing analyzes these small tables soon).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lookup_planned_on_empty_tables_goes_by_the_unique_index_once_they_are_full() {
        let (db, _) = crate::testing::fresh_db().await;
        sqlx::raw_sql(
            "ALTER TABLE workspace_auth_tokens SET (autovacuum_enabled = off); \
                       ALTER TABLE org_tokens SET (autovacuum_enabled = off)",
        )
        .execute(&db)
        .await
        .unwrap();
        let mut session = db.acquire().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = force_generic_plan; PREPARE lookup(bytea[]) AS {LOOKUP_TOKENS}")))
            .execute(&mut *session)
            .await
            .unwrap();
        let plan = async |conn: &mut PgConnection| {
            let rows: Vec<String> =
                sqlx::query_scalar("EXPLAIN EXECUTE lookup(ARRAY['\\x00'::bytea])").fetch_all(&mut *conn).await.unwrap();
            rows.join("\n")
        };
        let empty = plan(&mut session).await;
        let (org, _) = create_org(&mut session, "o").await.unwrap();
        let ws: Uuid = sqlx::query_scalar("INSERT INTO workspaces (org_id, name, runtime, tier) VALUES ($1, 'w', 'echo', 2) RETURNING id")
            .bind(org.0)
            .fetch_one(&db)
            .await
            .unwrap();
        sqlx::query("INSERT INTO workspace_auth_tokens (workspace_id, token_sha256) SELECT $1, sha256(g::text::bytea) FROM generate_series(1, 20000) g")
            .bind(ws)
            .execute(&db)
            .await
            .unwrap();
        let full = plan(&mut session).await;
        assert_eq!(full, empty, "the session still runs the plan made on the empty tables");
        for index in ["org_tokens_token_sha256_key", "workspace_auth_tokens_token_sha256_key"] {
            assert!(full.contains(&format!("Index Scan using {index}")), "{index} is not used:\n{full}");
        }
        assert!(!full.contains("workspace_auth_tokens_ws_idx"), "every live workspace token read:\n{full}");
    }
}
