//! What the EC2 backend reads from the platform's records ([`InstanceStore`]): the
//! instance recorded on a workspace's row, and the SSH host key pinned for an instance
//! (`ssh_host_keys`, owned here).

use molecule_backends::ec2::InstanceStore;
use molecule_backends::BackendError;
use molecule_domain::WorkspaceId;
use sqlx::PgPool;

pub struct DbInstances {
    db: PgPool,
}

impl DbInstances {
    pub fn new(db: PgPool) -> Self {
        DbInstances { db }
    }
}

fn store_err(e: sqlx::Error) -> BackendError {
    BackendError::EngineUnavailable(format!("the platform's database: {e}"))
}

#[async_trait::async_trait]
impl InstanceStore for DbInstances {
    async fn instance_id(&self, ws: WorkspaceId) -> Result<Option<String>, BackendError> {
        let id: Option<Option<String>> = sqlx::query_scalar("SELECT instance_id FROM workspaces WHERE id = $1")
            .bind(ws.0)
            .fetch_optional(&self.db)
            .await
            .map_err(store_err)?;
        Ok(id.flatten())
    }

    async fn pin_host_key(&self, instance_id: &str, key: &str) -> Result<String, BackendError> {
        // First writer wins; everyone reads the winner.
        sqlx::query_scalar(
            "WITH ins AS (INSERT INTO ssh_host_keys (instance_id, host_key) VALUES ($1, $2) \
                          ON CONFLICT (instance_id) DO NOTHING RETURNING host_key) \
             SELECT host_key FROM ins UNION ALL SELECT host_key FROM ssh_host_keys WHERE instance_id = $1 LIMIT 1",
        )
        .bind(instance_id)
        .bind(key)
        .fetch_one(&self.db)
        .await
        .map_err(store_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_key_seen_is_the_one_kept() {
        let (db, _) = molecule_domain::testing::fresh_db().await;
        let store = DbInstances::new(db);
        assert_eq!(store.pin_host_key("i-0abc", "ssh-ed25519 AAAA1").await.unwrap(), "ssh-ed25519 AAAA1");
        assert_eq!(store.pin_host_key("i-0abc", "ssh-ed25519 BBBB2").await.unwrap(), "ssh-ed25519 AAAA1");
        assert_eq!(store.pin_host_key("i-0def", "ssh-ed25519 BBBB2").await.unwrap(), "ssh-ed25519 BBBB2");
        assert_eq!(store.instance_id(WorkspaceId::new()).await.unwrap(), None);
    }
}
