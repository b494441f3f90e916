//! The A2A relay's shared code: what the API accepts from callers and what the dispatcher
//! sends to agents, across the protocol's generations.
//!
//! - [`normalize`] (J5a): a caller's JSON-RPC body (v0.2, v0.3 or v1.0) → one canonical
//!   request (v0.3 shapes), or a JSON-RPC error naming the field at fault.
//! - [`wire`]: messages, parts and tasks rendered in a generation (requests to agents,
//!   replies back to callers).
//! - [`queue`]: the `a2a_queue` table (push deliveries), its one owner.
//! - [`card`]: which generation an agent card announces.

pub mod card;
pub mod normalize;
pub mod queue;
pub mod wire;

use serde::{Deserialize, Serialize};

/// The generation an agent speaks (its registration's `a2a_version`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "a2a_version")]
pub enum AgentVersion {
    /// a2a-sdk 0.3.x: `message/send`, parts with a `kind`, roles `user`/`agent`.
    #[serde(rename = "0.3")]
    #[sqlx(rename = "0.3")]
    V03,
    /// a2a-sdk 1.x: `SendMessage`, parts without `kind`, roles `ROLE_USER`/`ROLE_AGENT`,
    /// header `A2A-Version: 1.0`.
    #[serde(rename = "1.0")]
    #[sqlx(rename = "1.0")]
    V10,
}

impl AgentVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentVersion::V03 => "0.3",
            AgentVersion::V10 => "1.0",
        }
    }

    /// What a caller of this generation gets back.
    pub fn as_generation(self) -> Generation {
        match self {
            AgentVersion::V03 => Generation::V03,
            AgentVersion::V10 => Generation::V10,
        }
    }
}

/// The generation a caller wrote its request in. v0.2 (a `content` field instead of
/// `parts`) is accepted from callers only; its replies are rendered as v0.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Generation {
    V02,
    V03,
    V10,
}

impl Generation {
    pub fn as_str(self) -> &'static str {
        match self {
            Generation::V02 => "0.2",
            Generation::V03 => "0.3",
            Generation::V10 => "1.0",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "0.2" => Some(Generation::V02),
            "0.3" => Some(Generation::V03),
            "1.0" => Some(Generation::V10),
            _ => None,
        }
    }

    /// Generation of the replies a caller of this generation reads.
    pub fn reply_version(self) -> AgentVersion {
        match self {
            Generation::V02 | Generation::V03 => AgentVersion::V03,
            Generation::V10 => AgentVersion::V10,
        }
    }
}

/// Request bodies of the A2A route are capped at 4 MiB (SPEC §3).
pub const BODY_LIMIT: usize = 4 << 20;

/// What the relay does with a request: send a message, or ask about a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `message/send`, `message/stream`, `SendMessage`, `SendStreamingMessage`. A queued
    /// relay has no open stream to its caller: streaming variants are delivered as sends.
    SendMessage,
    /// `tasks/get` / `GetTask`.
    GetTask,
    /// `tasks/cancel` / `CancelTask`.
    CancelTask,
}

impl Operation {
    /// The JSON-RPC method of this operation in a generation.
    pub fn method(self, v: AgentVersion) -> &'static str {
        match (self, v) {
            (Operation::SendMessage, AgentVersion::V03) => "message/send",
            (Operation::SendMessage, AgentVersion::V10) => "SendMessage",
            (Operation::GetTask, AgentVersion::V03) => "tasks/get",
            (Operation::GetTask, AgentVersion::V10) => "GetTask",
            (Operation::CancelTask, AgentVersion::V03) => "tasks/cancel",
            (Operation::CancelTask, AgentVersion::V10) => "CancelTask",
        }
    }

    /// The operation and caller generation of a JSON-RPC method name (v0.2 is told
    /// apart from v0.3 by the message's fields, not by the method).
    pub fn of_method(m: &str) -> Option<(Operation, Generation)> {
        Some(match m {
            "message/send" | "message/stream" => (Operation::SendMessage, Generation::V03),
            "SendMessage" | "SendStreamingMessage" => (Operation::SendMessage, Generation::V10),
            "tasks/get" => (Operation::GetTask, Generation::V03),
            "GetTask" => (Operation::GetTask, Generation::V10),
            "tasks/cancel" => (Operation::CancelTask, Generation::V03),
            "CancelTask" => (Operation::CancelTask, Generation::V10),
            _ => return None,
        })
    }
}
