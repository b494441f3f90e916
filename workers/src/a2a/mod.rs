//! The A2A relay's worker side (J6): [`dispatch`] delivers queued messages through
//! [`client`], the HTTP client that enforces X5 on the address it connects to.

pub mod client;
pub mod dispatch;

pub use client::AgentClient;
