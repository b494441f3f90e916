//! What the EC2 backend reads from the platform's records ([`InstanceStore`]): the
//! instance recorded on a workspace's row, and the SSH host key pinned for an instance
//! (`ssh_host_keys`, owned here).

use molecule_backends::BackendError;
use molecule_backends::ec2::InstanceStore;
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

    async fn host_key(&self, instance_id: &str) -> Result<Option<String>, BackendError> {
        sqlx::query_scalar("SELECT host_key FROM ssh_host_keys WHERE instance_id = $1")
            .bind(instance_id)
            .fetch_optional(&self.db)
            .await
            .map_err(store_err)
    }

    async fn pin_host_key(&self, instance_id: &str, key: &str) -> Result<String, BackendError> {
        // First writer wins and everyone reads the winner, in one statement: the no-op
        // update returns the stored row even when it was committed by a racing first use
        // after this statement's snapshot (which DO NOTHING + SELECT would not see).
        sqlx::query_scalar(
            "INSERT INTO ssh_host_keys (instance_id, host_key) VALUES ($1, $2) \
             ON CONFLICT (instance_id) DO UPDATE SET host_key = ssh_host_keys.host_key RETURNING host_key",
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
        assert_eq!(store.host_key("i-0abc").await.unwrap(), None);
        assert_eq!(store.pin_host_key("i-0abc", "ssh-ed25519 AAAA1").await.unwrap(), "ssh-ed25519 AAAA1");
        assert_eq!(store.host_key("i-0abc").await.unwrap().as_deref(), Some("ssh-ed25519 AAAA1"));
        assert_eq!(store.pin_host_key("i-0abc", "ssh-ed25519 BBBB2").await.unwrap(), "ssh-ed25519 AAAA1");
        assert_eq!(store.pin_host_key("i-0def", "ssh-ed25519 BBBB2").await.unwrap(), "ssh-ed25519 BBBB2");
        assert_eq!(store.instance_id(WorkspaceId::new()).await.unwrap(), None);
    }

    /// A first use racing another's still-open pin waits for it and reads the winner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_racing_first_use_reads_the_winner() {
        let (db, _) = molecule_domain::testing::fresh_db().await;
        let store = std::sync::Arc::new(DbInstances::new(db.clone()));
        let mut tx = db.begin().await.unwrap();
        sqlx::query("INSERT INTO ssh_host_keys (instance_id, host_key) VALUES ('i-race', 'ssh-ed25519 FIRST')")
            .execute(&mut *tx)
            .await
            .unwrap();
        let second = tokio::spawn({
            let store = store.clone();
            async move { store.pin_host_key("i-race", "ssh-ed25519 SECOND").await }
        });
        // The second pin waits on the first's row lock.
        molecule_domain::testing::until_a_statement_waits_on_a_lock(&db, "%").await;
        tx.commit().await.unwrap();
        assert_eq!(second.await.unwrap().unwrap(), "ssh-ed25519 FIRST");
    }
}
