//! The workspace runtimes the platform knows. `external` is an agent run elsewhere that
//! registers itself (no container); `echo` is the reference agent shipped in this repo.

pub const EXTERNAL: &str = "external";

pub const KNOWN: &[&str] =
    &["claude-code", "langgraph", "crewai", "autogen", "deepagents", "openclaw", "hermes", "codex", "gemini-cli", "echo", EXTERNAL];

pub fn is_known(runtime: &str) -> bool {
    KNOWN.contains(&runtime)
}
