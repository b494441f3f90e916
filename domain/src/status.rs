//! Workspace lifecycle statuses. Every value the code writes must exist in the
//! `workspace_status` enum of the migrations: the drift test below fails otherwise
//! (the original service once shipped two statuses the enum lacked, and every UPDATE
//! writing them failed silently — seed 003, migration 046).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[sqlx(type_name = "workspace_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceStatus {
    Provisioning,
    Online,
    Degraded,
    Offline,
    Failed,
    AwaitingAgent,
    Hibernating,
    Hibernated,
    Removed,
}

impl WorkspaceStatus {
    pub const ALL: [WorkspaceStatus; 9] = [
        Self::Provisioning,
        Self::Online,
        Self::Degraded,
        Self::Offline,
        Self::Failed,
        Self::AwaitingAgent,
        Self::Hibernating,
        Self::Hibernated,
        Self::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Online => "online",
            Self::Degraded => "degraded",
            Self::Offline => "offline",
            Self::Failed => "failed",
            Self::AwaitingAgent => "awaiting_agent",
            Self::Hibernating => "hibernating",
            Self::Hibernated => "hibernated",
            Self::Removed => "removed",
        }
    }
}

/// Values of `workspace_status` as the migrations define them: the `CREATE TYPE` list
/// plus every `ALTER TYPE workspace_status ADD VALUE`.
pub fn enum_values_in_migrations(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lower = sql.to_lowercase();
    let mut rest = lower.as_str();
    while let Some(i) = rest.find("create type workspace_status as enum") {
        let after = &rest[i..];
        if let (Some(open), Some(close)) = (after.find('('), after.find(')')) {
            out.extend(quoted_words(&after[open..close]));
        }
        rest = &after[1..];
    }
    let mut rest = lower.as_str();
    while let Some(i) = rest.find("alter type workspace_status add value") {
        let after = &rest[i..];
        let end = after.find(';').unwrap_or(after.len());
        out.extend(quoted_words(&after[..end]));
        rest = &after[1..];
    }
    out
}

/// Status literals that SQL in the code writes to workspaces: `'x'::workspace_status`
/// casts and `status = 'x'` / `status IN ('x', …)` inside statements on `workspaces`.
pub fn status_literals_in_code(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("::workspace_status") {
        let before = &rest[..i];
        if before.ends_with('\'') {
            if let Some(start) = before[..before.len() - 1].rfind('\'') {
                out.push(before[start + 1..before.len() - 1].to_string());
            }
        }
        rest = &rest[i + 1..];
    }
    for stmt in src.split(';') {
        let l = stmt.to_lowercase();
        if !(l.contains("update workspaces") || l.contains("insert into workspaces")) {
            continue;
        }
        let mut r = l.as_str();
        while let Some(i) = r.find("status") {
            let after = r[i + 6..].trim_start();
            let list = if let Some(a) = after.strip_prefix('=') {
                a.trim_start()
            } else if let Some(a) = after.strip_prefix("in") {
                a.trim_start()
            } else {
                r = &r[i + 6..];
                continue;
            };
            if let Some(a) = list.strip_prefix('(') {
                out.extend(quoted_words(&a[..a.find(')').unwrap_or(a.len())]));
            } else if list.starts_with('\'') {
                out.extend(quoted_words(&list[..list[1..].find('\'').map(|e| e + 2).unwrap_or(0)]));
            }
            r = &r[i + 6..];
        }
    }
    out
}

/// The statements in `src` (outside its tests) that write a workspace's status without a
/// guard on the status they change: each must say which statuses it moves from (`status =
/// '…'`, `status IN (…)`, `status <> 'removed'`), so none can move a `removed` workspace
/// anywhere else (issue 12). Writing `removed` itself needs no guard. Returns the
/// offending statements' first line.
pub fn unguarded_status_writes(src: &str) -> Vec<String> {
    let code = src.split("#[cfg(test)]").next().unwrap_or(src);
    let lower = code.to_lowercase();
    // `status = …` assigned in a SET list (not compared in a WHERE or a CASE).
    let assigns = regex::Regex::new(r"(?s)^\s*(?:as\s+\w+\s+|\w+\s+)?set\s+(?:.*?,\s*)?(?:\w+\.)?status\s*=\s*(.{0,40})").ok();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = lower[from..].find("update workspaces").map(|i| i + from) {
        // The SQL string runs to its closing quote.
        let end = lower[i..].find('"').map(|e| i + e).unwrap_or(lower.len());
        let stmt = &lower[i + "update workspaces".len()..end];
        from = end.max(i + 1);
        let (set, filter) = match stmt.split_once(" where ") {
            Some((set, filter)) => (set, filter),
            None => (stmt, ""),
        };
        let Some(value) = assigns.as_ref().and_then(|r| r.captures(set)).and_then(|c| c.get(1)).map(|m| m.as_str()) else {
            continue; // does not write the status
        };
        let guarded = value.starts_with("'removed'")
            || value.starts_with("case when status in (")
            || value.starts_with("case when status = '")
            || filter.contains("status = '")
            || filter.contains("status in (")
            || filter.contains("status <> 'removed'");
        // (`w.status = '…'` contains `status = '`: an alias changes nothing.)
        if !guarded {
            out.push(code[i..end].lines().next().unwrap_or("").trim().to_string());
        }
    }
    out
}

fn quoted_words(s: &str) -> Vec<String> {
    s.split('\'').skip(1).step_by(2).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn migrations_sql() -> String {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let mut files: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "sql")).collect();
        files.sort();
        files.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect::<Vec<_>>().join("\n")
    }

    fn rust_sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() && name != "target" && !name.starts_with('.') {
                rust_sources(&p, out);
            } else if name.ends_with(".rs") || name.ends_with(".sql") {
                out.push((p.display().to_string(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }

    #[test]
    fn every_status_the_code_knows_is_in_the_enum() {
        let values = enum_values_in_migrations(&migrations_sql());
        assert!(values.len() >= 9, "parsed enum values: {values:?}");
        for s in WorkspaceStatus::ALL {
            assert!(values.iter().any(|v| v == s.as_str()), "{} missing from workspace_status", s.as_str());
        }
    }

    #[test]
    fn every_status_literal_written_by_code_is_in_the_enum() {
        let values = enum_values_in_migrations(&migrations_sql());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for crate_dir in ["api", "jobs", "scheduler", "domain", "cli", "workers"] {
            rust_sources(&root.join(crate_dir), &mut files);
        }
        assert!(!files.is_empty());
        for (path, src) in files {
            if path.ends_with("status.rs") {
                continue; // this file's own test fixtures
            }
            for lit in status_literals_in_code(&src) {
                assert!(values.contains(&lit), "{path} writes workspace status '{lit}' that the enum lacks");
            }
        }
    }

    /// No statement anywhere can move a `removed` workspace to another status.
    #[test]
    fn every_status_write_is_guarded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for crate_dir in ["api", "jobs", "scheduler", "domain", "cli", "workers"] {
            rust_sources(&root.join(crate_dir), &mut files);
        }
        let mut writes = 0;
        for (path, src) in &files {
            if path.ends_with("status.rs") {
                continue;
            }
            writes += src.split("#[cfg(test)]").next().unwrap_or("").to_lowercase().matches("update workspaces set status").count();
            let bad = unguarded_status_writes(src);
            assert!(bad.is_empty(), "{path} writes a workspace status without a status guard: {bad:?}");
        }
        assert!(writes >= 10, "found only {writes} status writes: is the scan looking in the right place?");
        // And it can fail.
        let code = r#"sqlx::query("UPDATE workspaces SET status = 'online', updated_at = now() WHERE id = $1");
                      sqlx::query("UPDATE workspaces SET status = 'offline' WHERE id = $1 AND status = 'online'");
                      sqlx::query("UPDATE workspaces SET status = 'removed' WHERE id = $1");
                      sqlx::query("UPDATE workspaces AS w SET status = 'failed' WHERE w.id = $1");"#;
        assert_eq!(
            unguarded_status_writes(code),
            vec![
                "UPDATE workspaces SET status = 'online', updated_at = now() WHERE id = $1",
                "UPDATE workspaces AS w SET status = 'failed' WHERE w.id = $1"
            ]
        );
    }

    #[test]
    fn the_scanner_catches_a_missing_value() {
        // The gate must be able to fail: a status the enum lacks is reported.
        let enum_sql = "CREATE TYPE workspace_status AS ENUM ('provisioning', 'online');\n\
                        ALTER TYPE workspace_status ADD VALUE IF NOT EXISTS 'failed';";
        let values = enum_values_in_migrations(enum_sql);
        assert_eq!(values, ["provisioning", "online", "failed"]);
        let code = r#"sqlx::query("UPDATE workspaces SET status = 'hibernating' WHERE id = $1");
                      sqlx::query("UPDATE workspaces SET status = 'awaiting_agent'::workspace_status");
                      sqlx::query("UPDATE workspaces SET x = 1 WHERE status IN ('online', 'degraded')");"#;
        let lits = status_literals_in_code(code);
        assert!(lits.contains(&"hibernating".to_string()));
        assert!(lits.contains(&"awaiting_agent".to_string()));
        assert!(lits.contains(&"degraded".to_string()));
        assert!(lits.iter().any(|l| !values.contains(l)));
    }
}
