pub mod exec;
pub mod health;
pub mod jobs;
pub mod queues;
pub mod registry;
pub mod rescue;
pub mod workspaces;
