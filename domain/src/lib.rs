//! Shared domain of the Molecule workspace server: identifiers, workspace statuses, and
//! the PostgreSQL plumbing every process needs (connection, migrations, the embedded
//! cluster used when no `DATABASE_URL` is given).

pub mod a2a;
pub mod activity;
pub mod console;
pub mod db;
pub mod embedded_pg;
pub mod events;
pub mod ids;
pub mod redact;
pub mod runtimes;
pub mod sessions;
pub mod ssrf;
pub mod status;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;
pub mod tokens;

pub use ids::{JobId, OrgId, WorkspaceId};
pub use status::WorkspaceStatus;
