//! X4: the one secret redactor. Everything that leaves a workspace into storage or logs
//! goes through [`Redactor::redact`]. Matches are replaced whole — never a prefix of a
//! secret survives — with `[REDACTED]` (keys of `key=value` pairs are kept so the text
//! stays readable).

use regex::Regex;
use std::borrow::Cow;

pub const MARK: &str = "[REDACTED]";

pub struct Redactor {
    whole: Vec<Regex>,
    pairs: Vec<Regex>,
}

impl Redactor {
    pub fn new() -> Redactor {
        // Each pattern is a literal known to compile; a typo fails the unit tests.
        let whole = [
            // Private key blocks (PEM), whatever the key type.
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY-----",
            // AWS access key ids.
            r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",
            // Our own tokens and secrets.
            r"\bmol_(?:org|ws|pis)_[0-9a-f]{16,}\b",
            // Provider keys: OpenAI/Anthropic style sk-…, GitHub, GitLab, Slack, Google, Stripe.
            r"\bsk-[A-Za-z0-9_\-]{16,}",
            r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b",
            r"\bgithub_pat_[A-Za-z0-9_]{30,}\b",
            r"\bglpat-[A-Za-z0-9_\-]{20,}\b",
            r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",
            r"\bAIza[0-9A-Za-z_\-]{35}\b",
            r"\b(?:rk|sk|pk)_(?:live|test)_[0-9A-Za-z]{16,}\b",
            // JSON web tokens.
            r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
            // Bearer / token auth headers (long enough to be a credential, not prose).
            r"(?i)\b(?:bearer|token)\s+[A-Za-z0-9\-._~+/]{16,}=*",
            // Credentials inside URLs: scheme://user:password@host
            r"(?i)\b[a-z][a-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@",
        ]
        .into_iter()
        .map(|p| Regex::new(p).expect("redactor pattern"))
        .collect();
        let key = r"(?:password|passwd|pwd|secret|client_secret|secret_key|aws_secret_access_key|token|access_token|auth_token|refresh_token|api_key|apikey|api_token|private_key)";
        let pairs = [
            // "key": "value" (JSON)
            format!(r#"(?i)("[A-Za-z0-9_\-]*{key}"\s*:\s*")([^"]+)(")"#),
            // key=value / key: value (env files, YAML, query strings, logs)
            format!(r#"(?i)(\b[A-Za-z0-9_\-]*{key}\b\s*[=:]\s*["']?)([^\s"',;&]+)(["']?)"#),
        ]
        .into_iter()
        .map(|p| Regex::new(&p).expect("redactor pattern"))
        .collect();
        Redactor { whole, pairs }
    }

    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out: Cow<'a, str> = Cow::Borrowed(text);
        for re in &self.pairs {
            if re.is_match(&out) {
                out = Cow::Owned(re.replace_all(&out, |c: &regex::Captures| {
                    if c[2].starts_with('[') && &c[2] == MARK {
                        c[0].to_string()
                    } else {
                        format!("{}{MARK}{}", &c[1], &c[3])
                    }
                }).into_owned());
            }
        }
        for re in &self.whole {
            if re.is_match(&out) {
                out = Cow::Owned(re.replace_all(&out, MARK).into_owned());
            }
        }
        out
    }
}

/// The process-wide redactor (built once; its patterns are compiled at first use).
pub fn global() -> &'static Redactor {
    static R: std::sync::LazyLock<Redactor> = std::sync::LazyLock::new(Redactor::new);
    &R
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real-looking secrets (none of them live) and the part that must not survive.
    const SECRETS: &[(&str, &str)] = &[
        ("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("key id ASIAY34FZKBOKMUTVV7A in use", "ASIAY34FZKBOKMUTVV7A"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "eyJhbGciOiJIUzI1NiJ9"),
        ("curl -H 'Authorization: Bearer 9f86d081884c7d659a2feaa0c55ad015'", "9f86d081884c7d659a2feaa0c55ad015"),
        ("OPENAI_API_KEY=sk-proj-4fJk29XzQ8LmN0pR7sT1uVwY3aBcDeFgHiJkLmNo", "sk-proj-4fJk29XzQ8"),
        ("ANTHROPIC_API_KEY: sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_AbCd", "sk-ant-api03-AbCd"),
        ("using key sk-AbCdEfGhIjKlMnOpQrStUvWx for calls", "sk-AbCdEfGhIjKlMnOp"),
        ("GITHUB_TOKEN=ghp_16C7e42F292c6912E7710c838347Ae178B4a", "ghp_16C7e42F292c"),
        ("slack: xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "xoxb-123456789012"),
        ("google key AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "AIzaSyD-9tSrke72"),
        ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqL"),
        ("password=hunter2-correct-horse", "hunter2"),
        ("db_password: \"S3cr3t!Pa55\"", "S3cr3t!Pa55"),
        ("{\"api_key\": \"a1b2c3d4e5f6g7h8\", \"name\": \"x\"}", "a1b2c3d4e5f6g7h8"),
        ("https://example.com/cb?token=abc123def456&next=/home", "abc123def456"),
        ("DATABASE_URL=postgres://admin:Tr0ub4dor3@db.internal:5432/app", "Tr0ub4dor3"),
        ("client_secret = 'Qm9vbXNoYWthbGFrYQ'", "Qm9vbXNoYWthbGFrYQ"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----",
            "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU",
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA75xBqnyy\n-----END RSA PRIVATE KEY-----",
            "MIIEpAIBAAKCAQEA75xBqnyy",
        ),
        (
            "token mol_ws_9c56cc51b374c3ba189210d5b6d4bf57790d351c96c47c02190ecf1e430635ab issued",
            "9c56cc51b374c3ba",
        ),
        ("platform secret mol_pis_00112233445566778899aabbccddeeff", "00112233445566778899"),
    ];

    /// Text that must come through byte for byte.
    const HARMLESS: &[&str] = &[
        "INFO agent started on port 8000 (pid 17)",
        "The password policy requires 12 characters.",
        "tokens used: 1532 of 200000",
        "Bearer of bad news: the build failed at step 3/7",
        "image ghcr.io/molecule-ai/workspace-template-hermes@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "commit 317196463a fix(orphan-sweeper): close TOCTOU race",
        "workspace 8e863de1-3a82-4321-b4aa-b487a278b728 is online",
        "GET https://api.example.com/v1/models?limit=20 200",
        "skip-the-line task-1234 desk-lamp risk-assessment",
        "MODEL=claude-sonnet-4 PROVIDER=anthropic RUNTIME=claude-code",
        "docker ps -a\nCONTAINER ID   IMAGE   STATUS\n3f2a1b   echo    Up 2 minutes",
        "secret santa party on Friday",
    ];

    #[test]
    fn every_secret_in_the_corpus_is_removed_whole() {
        let r = Redactor::new();
        for (text, secret_part) in SECRETS {
            let out = r.redact(text);
            assert!(!out.contains(secret_part), "{text:?} leaked {secret_part:?}: {out:?}");
            assert!(out.contains(MARK), "{text:?} → {out:?}");
        }
    }

    #[test]
    fn harmless_text_survives_unchanged() {
        let r = Redactor::new();
        for text in HARMLESS {
            assert_eq!(r.redact(text), *text);
        }
    }

    #[test]
    fn keys_stay_readable_and_redaction_is_idempotent() {
        let r = Redactor::new();
        let once = r.redact("password=hunter2 user=bob").into_owned();
        assert_eq!(once, "password=[REDACTED] user=bob");
        assert_eq!(r.redact(&once), once);
    }
}
