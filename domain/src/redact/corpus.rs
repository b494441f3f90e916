//! The redactor's corpus: real-looking secrets of every family (none of them live) with
//! the part that must not survive, and harmless text that must come through byte for byte.
//! Also replayed end to end through an exec (tests/tests/isolation.rs).

/// (family, text, the part that must not survive).
pub const SECRETS: &[(&str, &str, &str)] = &[
    (
        "private_key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU",
    ),
    (
        "private_key",
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\nMIIEpAIBAAKCAQEA75xBqnyy\n-----END RSA PRIVATE KEY-----",
        "MIIEpAIBAAKCAQEA75xBqnyy",
    ),
    (
        "private_key",
        "key: -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5cmNQgHUSgBkFoAoGCCqGSM49\nAwEHoUQDQgAE",
        "MHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBn",
    ),
    (
        "private_key",
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF0y5kABCADcp1z2xYb0HqA8ZXmA\n=Qs3J\n-----END PGP PRIVATE KEY BLOCK-----",
        "lQOYBF0y5kABCADcp1z2xYb0HqA8ZXmA",
    ),
    (
        "private_key",
        r#"{"private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"}"#,
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
    ),
    (
        "private_key",
        "tls:\n  key: |\n    -----BEGIN RSA PRIVATE KEY-----\n    MIIEpAIBAAKCAQEAindentedKeyBody0123\n    QmFzZTY0Qm9keUxpbmVUd28xMjM0NTY3OA==\n    -----END RSA PRIVATE KEY-----\n  cert: x",
        "indentedKeyBody0123",
    ),
    (
        "private_key",
        "...log tail starts here\nQmFzZTY0Qm9keUxpbmVPbmVBYmNkZWZnaA==\nVGFpbE9mQUtleVRoYXRXYXNDdXRPZmYxMjM=\n-----END RSA PRIVATE KEY-----\nagent exited",
        "VGFpbE9mQUtleVRoYXRXYXNDdXRPZmYxMjM",
    ),
    ("aws", "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("aws", "key id ASIAY34FZKBOKMUTVV7A in use", "ASIAY34FZKBOKMUTVV7A"),
    ("aws", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG"),
    ("github", "GITHUB_TOKEN=ghp_16C7e42F292c6912E7710c838347Ae178B4a", "ghp_16C7e42F292c"),
    ("github", "token github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEF", "github_pat_11ABCDEFG01"),
    ("gitlab", "CI token glpat-xPz4Rv8YmQ2wK9sLbN3t found", "glpat-xPz4Rv8YmQ2wK9"),
    ("slack", "slack: xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "xoxb-123456789012"),
    ("slack", "notify https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX now", "T00000000/B00000000/XXXX"),
    (
        "discord",
        "hook https://discord.com/api/webhooks/123456789012345678/AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "AbCdEfGhIjKlMnOpQrStUvWx",
    ),
    ("stripe", "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqL"),
    ("stripe", "STRIPE_WEBHOOK=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_MfKQ9r8GKY"),
    ("openai_anthropic", "OPENAI_API_KEY=sk-proj-4fJk29XzQ8LmN0pR7sT1uVwY3aBcDeFgHiJkLmNo", "sk-proj-4fJk29XzQ8"),
    ("openai_anthropic", "ANTHROPIC_API_KEY: sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_AbCd", "sk-ant-api03-AbCd"),
    ("openai_anthropic", "using key sk-AbCdEfGhIjKlMnOpQrStUvWx for calls", "sk-AbCdEfGhIjKlMnOp"),
    ("google", "google key AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "AIzaSyD-9tSrke72"),
    ("google", "client 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", "GOCSPX-1a2B3c4D5e6F"),
    ("google", "access ya29.a0AfH6SMBx3dJ7kLmNoPqRsTuVwXyZ0123456789", "ya29.a0AfH6SMBx3dJ7k"),
    ("azure", "AZURE_CLIENT_SECRET abc8Q~AbCdEfGhIjKlMnOpQrStUvWxYz0123456", "8Q~AbCdEfGhIjKlMnOp"),
    (
        "connection_string",
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c3VwZXJzZWNyZXRrZXlzdXBlcnNlY3JldGtleXN1cGVyc2VjcmV0a2V5MTIzNA==;EndpointSuffix=core.windows.net",
        "c3VwZXJzZWNyZXRrZXlz",
    ),
    (
        "connection_string",
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=AbCd1234EfGh5678IjKl9012MnOp=",
        "AbCd1234EfGh5678",
    ),
    ("connection_string", "Server=db;Database=app;User Id=sa;Password=P@ssw0rd-Very-Long;", "P@ssw0rd-Very-Long"),
    ("connection_string", "Server=db;User Id=sa;Password=my secret pass;", "secret pass"),
    (
        "connection_string",
        "https://acct.blob.core.windows.net/c/f?sv=2022-11-02&se=2026-12-01&sig=AbCdEfGh1234%2BIjKlMnOp%3D",
        "AbCdEfGh1234%2BIjKl",
    ),
    ("npm", "//registry.npmjs.org/:_authToken=npm_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789", "npm_AbCdEfGhIjKlMnOp"),
    ("pypi", "password = pypi-AgEIcHlwaS5vcmcCJDAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMAACKlsz", "pypi-AgEIcHlwaS5vcmc"),
    ("huggingface", "HF_TOKEN hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh", "hf_AbCdEfGhIjKlMnOp"),
    ("sendgrid", "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", "TwL2iGABf9DHoTf"),
    ("twilio", "TWILIO_API_KEY SK0123456789abcdef0123456789abcdef", "SK0123456789abcdef01"),
    ("mailgun", "mailgun key-3ax6xnjp29jd6fds4gc373sgvjxteol0", "key-3ax6xnjp29jd6fds"),
    ("digitalocean", "do token dop_v1_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "dop_v1_0123456789ab"),
    ("shopify", "shpat_0123456789abcdef0123456789abcdef", "shpat_0123456789ab"),
    ("databricks", "DATABRICKS dapi0123456789abcdef0123456789abcdef", "dapi0123456789abcdef"),
    ("telegram", "bot 123456789:AAEhBOweik6ad9r_QXMENQjcrGbqCr4K-Hs", "AAEhBOweik6ad9r"),
    ("molecule", "token mol_ws_9c56cc51b374c3ba189210d5b6d4bf57790d351c96c47c02190ecf1e430635ab issued", "9c56cc51b374c3ba"),
    ("molecule", "platform secret mol_pis_00112233445566778899aabbccddeeff", "00112233445566778899"),
    ("jwt", "session eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "dozjgNryP4J3jVmNHl0w"),
    ("http_auth", "Authorization: Bearer c0ffee8a91b24d7e8e1f03a2b6d4f5e7", "c0ffee8a91b24d7e8e1f03a2b6d4f5e7"),
    ("http_auth", "Authorization: Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy"),
    (
        "http_auth",
        r#"authorization: Digest username="bob", realm="x", nonce="dcd98b7102dd2f0e", response="6629fae49393a05397450978507c4ef1""#,
        "6629fae49393a053974",
    ),
    ("http_auth", "curl -H 'Authorization: Bearer 5eed1e55b0a7c4d2e9f18a3b7c6d5e4f'", "5eed1e55b0a7c4d2e9f1"),
    ("http_auth", "call with token dGhpc2lzYXRva2VuMTIzNDU2Nzg5MA== now", "dGhpc2lzYXRva2VuMTIz"),
    ("api_key_header", "X-Api-Key: 8d3f9a1c2b7e4f60a5d1", "8d3f9a1c2b7e4f60a5d1"),
    ("api_key_header", "PRIVATE-TOKEN: aB3dE5fG7hI9jK1l", "aB3dE5fG7hI9jK1l"),
    ("url_credentials", "DATABASE_URL=postgres://admin:Tr0ub4dor3@db.internal:5432/app", "Tr0ub4dor3"),
    ("url_credentials", "redis://:s3cr3tRedisPass@cache:6379/0", "s3cr3tRedisPass"),
    ("url_credentials", "postgres://admin:aB3/xY+z9@db/app", "aB3/xY+z9"),
    ("url_credentials", "mysql://root:p@ss@w0rd!@mysql.internal:3306/db", "ss@w0rd!"),
    ("secret_key_json", r#"{"api_key": "a1b2c3d4e5f6g7h8", "name": "x"}"#, "a1b2c3d4e5f6g7h8"),
    ("secret_key_json", r#"{"clientSecret":"Zm9vYmFy-Yml6"}"#, "Zm9vYmFy-Yml6"),
    ("secret_key_quoted", r#"db_password: "S3cr3t!Pa55""#, "S3cr3t!Pa55"),
    ("secret_key_quoted", r#"password = "correct horse battery staple""#, "correct horse battery"),
    ("secret_key_quoted", "client_secret = 'Qm9vbXNoYWthbGFrYQ'", "Qm9vbXNoYWthbGFrYQ"),
    ("secret_key_xml", "<config><password>hunter2-xml</password></config>", "hunter2-xml"),
    ("secret_key_flag", "mysql -u root --password=hunter2-flag db", "hunter2-flag"),
    ("secret_key_flag", "vault login --token s.AbCdEfGh1234", "s.AbCdEfGh1234"),
    ("secret_key_flag", r#"deploy --password "two words here" --yes"#, "two words here"),
    ("secret_key", "password=hunter2-correct-horse", "hunter2"),
    ("secret_key", "export SLACK_BOT_TOKEN=abc-def-ghi-123", "abc-def-ghi-123"),
    ("secret_key", "https://example.com/cb?token=abc123def456&next=/home", "abc123def456"),
    ("secret_key", "credentials: u5er:pa55w0rd", "u5er:pa55w0rd"),
    ("secret_key", "ENCRYPTION_KEY=0f1e2d3c4b5a69788796a5b4c3d2e1f0", "0f1e2d3c4b5a6978"),
    ("secret_key", "run with DB_PASSWORD=Xy7,Qp2!abc now", "Qp2!abc"),
    ("secret_key", "export DB_PASSWORD=$uperS3cret", "uperS3cret"),
    ("secret_key", "pin: password=20240131", "20240131"),
    ("secret_key_line", "database:\n  password: correct horse battery\n  user: app", "horse battery"),
    ("secret_key_line", "  api_token: tok en with spaces # set by ops", "en with spaces"),
];

/// Text that must come through byte for byte: hashes, ids, commits, prose about
/// passwords and tokens, token counts, references to secrets that are not secrets.
pub const HARMLESS: &[&str] = &[
    "INFO agent started on port 8000 (pid 17)",
    "The password policy requires 12 characters.",
    "Forgot your password? Reset it from the login page.",
    "Please reset your password: click the link below.",
    "tokens used: 1532 of 200000",
    "max_tokens: 4096",
    r#"{"max_tokens": 1024, "temperature": 0.2}"#,
    "Bearer of bad news: the build failed at step 3/7",
    "token authentication is enabled",
    "image ghcr.io/molecule-ai/workspace-template-hermes@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "sha256sum: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  build.tar",
    "commit 317196463a fix(orphan-sweeper): close TOCTOU race",
    "workspace 8e863de1-3a82-4321-b4aa-b487a278b728 is online",
    "GET https://api.example.com/v1/models?limit=20 200",
    "skip-the-line task-1234 desk-lamp risk-assessment",
    "MODEL=claude-sonnet-4 PROVIDER=anthropic RUNTIME=claude-code",
    "docker ps -a\nCONTAINER ID   IMAGE   STATUS\n3f2a1b   echo    Up 2 minutes",
    "secret santa party on Friday",
    "password: ${DB_PASSWORD}",
    "api_key: $OPENAI_API_KEY",
    "token_count=37 prompt_tokens=12",
    "The SECRET_KEY setting lives in settings.py",
    "basic authentication is disabled",
    "see https://docs.example.com/auth/tokens for details",
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBkg4LVWM9nuwNSk3yByxZpYRT user@host",
    "PWD=/home/agent\nOLDPWD=/\nHOME=/home/agent\nSHLVL=1",
    "Little Rock, Arkansas: 72201",
    "git clone https://github.com/molecule-ai/server.git",
    "ssh git@github.com:molecule-ai/server.git",
];

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    #[test]
    fn every_family_has_corpus_entries() {
        let r = Redactor::new();
        for family in r.families() {
            assert!(SECRETS.iter().any(|(f, _, _)| *f == family), "family {family} has no corpus entry");
        }
    }

    #[test]
    fn every_secret_in_the_corpus_is_removed_whole() {
        let r = Redactor::new();
        for (family, text, secret_part) in SECRETS {
            let out = r.redact(text);
            assert!(!out.contains(secret_part), "{family}: {text:?} leaked {secret_part:?}: {out:?}");
            assert!(out.contains(MARK), "{family}: {text:?} → {out:?}");
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
    fn names_stay_readable_and_redaction_is_idempotent() {
        let r = Redactor::new();
        let once = r.redact("password=hunter2x user=bob").into_owned();
        assert_eq!(once, "password=[REDACTED] user=bob");
        assert_eq!(r.redact(&once), once);
        assert_eq!(r.redact("X-Api-Key: 8d3f9a1c2b7e4f60a5d1"), "X-Api-Key: [REDACTED]");
        for (_, text, _) in SECRETS {
            let once = r.redact(text).into_owned();
            assert_eq!(r.redact(&once), once, "{text:?}");
        }
    }

    /// A key cut off by a cap (no END line) is redacted to where it was cut; the text before
    /// it stays.
    #[test]
    fn a_truncated_private_key_is_still_removed() {
        let r = Redactor::new();
        let cut = "boot log\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA75xBqnyyAbCdEfGh\nMIIEpAIBAAKCAQEA75xBq";
        let out = r.redact(cut);
        assert!(out.starts_with("boot log\n") && !out.contains("MIIEpAIB"), "{out:?}");
    }

    /// Every secret, split into two chunks at every byte, never leaves a stream unredacted.
    #[test]
    fn a_stream_never_lets_a_secret_out_in_pieces() {
        let r = Redactor::new();
        for (family, text, secret_part) in SECRETS {
            // A key whose BEGIN line never came (a log's tail) is known for one only at its
            // END line: whole texts catch it, a stream that began mid-key cannot.
            if text.contains("-----END") && !text.contains("-----BEGIN") {
                continue;
            }
            let bytes = format!("{text}\n").into_bytes();
            for at in 1..bytes.len() {
                let mut s = StreamRedactor::new(&r);
                let mut out = s.push(&bytes[..at]);
                out.push_str(&s.push(&bytes[at..]));
                out.push_str(&s.finish());
                assert!(!out.contains(secret_part), "{family} split at {at}: {out:?}");
            }
        }
        for text in HARMLESS {
            let mut s = StreamRedactor::new(&r);
            let mut out = String::new();
            for b in format!("{text}\n").as_bytes().chunks(3) {
                out.push_str(&s.push(b));
            }
            out.push_str(&s.finish());
            assert_eq!(out, format!("{text}\n"), "harmless text through a stream");
        }
    }

    /// A key whose BEGIN line was cut off (a log's tail) is removed up to its END line
    /// whatever its last lines look like: PGP's short checksum line, a PEM body's short
    /// last line. Base64 lines before no END line, or before a certificate's, stay.
    #[test]
    fn a_key_tail_with_short_last_lines_is_removed() {
        let r = Redactor::new();
        let pgp = r.redact("up\nlQOYBF0y5kABCADcp1z2xYb0HqA8ZXmA\n=Qs3J\n-----END PGP PRIVATE KEY BLOCK-----\n");
        assert!(!pgp.contains("lQOYBF0y") && !pgp.contains("Qs3J") && pgp.contains(MARK), "{pgp:?}");
        let pem = r.redact(
            "tail:\nQmFzZTY0Qm9keUxpbmVPbmVBYmNkZWZnaA==\nVGFpbE9mQUtleVRoYXRXYXNDdXRPZmYxMjM0\nAbCd3Q==\n-----END RSA PRIVATE KEY-----\nexit 0\n",
        );
        assert_eq!(pem, "tail:\n[REDACTED]\nexit 0\n");
        // A tail that starts at the short last lines, or inside a body line (cut by size):
        // nothing above them tells them apart.
        for (text, secret) in [
            ("Zm9vYmFy\nQmFzZTY0Qm9keUxpbmVPbmVBYmNkZWZnaA==\nAbCd3Q==\n-----END RSA PRIVATE KEY-----\n", "Zm9vYmFy"),
            ("AbCd3Q==\n-----END RSA PRIVATE KEY-----\nexit 0\n", "AbCd3Q"),
            ("AbCd3Q==\n=Qs3J\n-----END PGP PRIVATE KEY BLOCK-----\n", "Qs3J"),
        ] {
            let out = r.redact(text);
            assert!(!out.contains(secret) && out.starts_with(MARK), "{out:?}");
        }
        for text in [
            "=abcd\nnext line\n",
            "checksum\n=abcd\n",
            "QmFzZTY0Qm9keUxpbmVPbmVBYmNkZWZnaA==\nAbCd3Q==\n",
            "MIIBszCCAVmgAwIBAgIUQ\nAbCd==\n-----END CERTIFICATE-----\n",
            "-----END RSA PRIVATE KEY-----\n",
        ] {
            assert_eq!(r.redact(text), text);
        }
    }

    /// A key's tail at a large text's segment boundary (no BEGIN line to keep the segment
    /// whole) is removed like in a small text.
    #[test]
    fn a_key_tail_across_a_segment_boundary_is_removed() {
        let r = Redactor::new();
        let mut text = String::new();
        while text.len() < SEGMENT - 100 {
            text.push_str("filler\n");
        }
        for i in 0..8 {
            text.push_str(&format!("S2V5Qm9keUxpbmU{i}{}\n", "A".repeat(48)));
        }
        text.push_str("AbCd3Q==\n-----END RSA PRIVATE KEY-----\nafter\n");
        let out = r.redact(&text);
        assert!(!out.contains("S2V5Qm9keUxpbmU") && !out.contains("AbCd3Q"), "{:?}", &out[out.len() - 400..]);
        assert!(out.ends_with("filler\n[REDACTED]\nafter\n"), "{:?}", &out[out.len() - 100..]);
    }

    /// A key is held by its own size, not the buffer's: a batch of output larger than the
    /// hold that ends mid-key releases the text before the key and keeps the key.
    #[test]
    fn a_key_after_a_large_batch_is_held_until_it_ends() {
        let r = Redactor::new();
        let one = format!("TGluZU9uZU9mQUtleQ{}", "B".repeat(46));
        let two = format!("TGluZVR3b09mQUtleQ{}", "C".repeat(46));
        let mut first = "filler\n".repeat(70 * 1024 / 7);
        first.push_str(&format!("-----BEGIN RSA PRIVATE KEY-----\n{one}\n"));
        let mut s = StreamRedactor::new(&r);
        let mut out = s.push(first.as_bytes());
        assert!(out.ends_with("filler\n") && s.held.starts_with(b"-----BEGIN"), "the key is held");
        out.push_str(&s.push(format!("{two}\nAbCd3Q==\n-----END RSA PRIVATE KEY-----\n").as_bytes()));
        out.push_str(&s.finish());
        assert!(!out.contains("TGluZU9uZU9m") && !out.contains("TGluZVR3b09m") && !out.contains("AbCd3Q"), "{:?}", &out[out.len() - 200..]);
        assert!(out.ends_with("filler\n[REDACTED]\n"), "{:?}", &out[out.len() - 200..]);
    }

    /// A key larger than the hold is not held whole: past the hold its part so far leaves
    /// redacted, and its further body lines are dropped until its END line, so the stream
    /// holds bounded memory and nothing of the key leaves. A BEGIN line followed by
    /// ordinary text lets that text through.
    #[test]
    fn a_key_larger_than_the_hold_is_removed_with_bounded_memory() {
        let r = Redactor::new();
        let mut key = String::from("before\n-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: 1\n\n");
        let mut i = 0;
        while key.len() < 3 * STREAM_HOLD {
            key.push_str(&format!("UEdQQm9keUxpbmU{i:08}{}\n", "x".repeat(40)));
            i += 1;
        }
        key.push_str("AbCd3Q==\n=Qs3J\n-----END PGP PRIVATE KEY BLOCK-----\nafter\n");
        for chunk_size in [1000, 4096, 70_000] {
            let mut s = StreamRedactor::new(&r);
            let mut out = String::new();
            for chunk in key.as_bytes().chunks(chunk_size) {
                out.push_str(&s.push(chunk));
                assert!(s.held.len() <= STREAM_HOLD + chunk_size, "held {} bytes", s.held.len());
            }
            out.push_str(&s.finish());
            assert!(!out.contains("UEdQQm9keUxpbmU") && !out.contains("AbCd3Q") && !out.contains("Qs3J"), "chunks of {chunk_size}");
            assert_eq!(out, "before\n[REDACTED]\nafter\n", "chunks of {chunk_size}");
        }
        // Cut off before its END: the rest is dropped too, a partial last line included.
        let mut s = StreamRedactor::new(&r);
        let mut out = s.push(&key.as_bytes()[..2 * STREAM_HOLD + 30]);
        out.push_str(&s.finish());
        assert!(!out.contains("UEdQQm9keUxpbmU"), "{:?}", &out[..out.len().min(200)]);
        // A stray BEGIN line: the text after the base64 lines comes through.
        let mut stray = String::from("-----BEGIN RSA PRIVATE KEY-----\n");
        while stray.len() < 2 * STREAM_HOLD {
            stray.push_str(&format!("{}\n", "QUJD".repeat(16)));
        }
        stray.push_str("INFO agent started on port 8000\nmore log\n");
        let mut s = StreamRedactor::new(&r);
        let mut out = String::new();
        for chunk in stray.as_bytes().chunks(4096) {
            out.push_str(&s.push(chunk));
        }
        out.push_str(&s.finish());
        assert!(!out.contains("QUJD") && out.ends_with("INFO agent started on port 8000\nmore log\n"), "{out:?}");
    }

    /// A stray BEGIN line followed by more than the hold of ordinary log lines (no END)
    /// leaves redacted, and the stream is not left dropping lines: the next lines come
    /// through even when they are made only of base64 characters.
    #[test]
    fn lines_after_a_stray_begin_line_past_the_hold_come_through() {
        let r = Redactor::new();
        let mut log = String::from("-----BEGIN RSA PRIVATE KEY-----\n");
        let mut i = 0;
        while log.len() < 70 * 1024 {
            log.push_str(&format!("INFO request {i} served in 3 ms\n"));
            i += 1;
        }
        for chunk_size in [4096, 70 * 1024 + 100] {
            let mut s = StreamRedactor::new(&r);
            let mut out = String::new();
            for chunk in log.as_bytes().chunks(chunk_size) {
                out.push_str(&s.push(chunk));
            }
            let next = s.push(b"OK\n200\ndone\ntrue\npassword=hunter2x\n");
            assert_eq!(next, "OK\n200\ndone\ntrue\npassword=[REDACTED]\n", "chunks of {chunk_size}");
            out.push_str(&next);
            out.push_str(&s.finish());
            assert!(out.starts_with(MARK) && !out.contains("-----BEGIN"), "chunks of {chunk_size}");
            assert!(out.contains("request 0 served in 3 ms\nINFO request 1 served"), "chunks of {chunk_size}");
            assert!(out.contains(&format!("INFO request {} served", i - 1)), "chunks of {chunk_size}");
        }
    }

    /// Once a key larger than the hold is being dropped, dropping stops at the first line
    /// that is not of its body: a word after the body's base64 lines comes through, while
    /// the key's own short last lines (before its END line) never do, however they arrive.
    #[test]
    fn dropping_a_large_key_stops_at_the_first_line_not_of_it() {
        let r = Redactor::new();
        let mut key = String::from("-----BEGIN RSA PRIVATE KEY-----\n");
        let mut i = 0;
        while key.len() < 2 * STREAM_HOLD {
            key.push_str(&format!("S2V5Qm9keQ{i:08}{}\n", "z".repeat(46)));
            i += 1;
        }
        // No END line: the log goes on with words made of base64 characters.
        for chunk_size in [1000, 4096, 70_000] {
            let text = format!("{key}done\ntrue\nexit 0\n");
            let mut s = StreamRedactor::new(&r);
            let mut out = String::new();
            for chunk in text.as_bytes().chunks(chunk_size) {
                out.push_str(&s.push(chunk));
            }
            out.push_str(&s.finish());
            assert!(!out.contains("S2V5Qm9keQ"), "chunks of {chunk_size}");
            assert_eq!(out, "[REDACTED]\ndone\ntrue\nexit 0\n", "chunks of {chunk_size}");
        }
        // The key's short last lines, a line per push, are dropped through its END line.
        for tail in [&["AbCd3Q==\n", "-----END RSA PRIVATE KEY-----\n"][..], &["AbCd3Q==\n", "=Qs3J\n", "-----END RSA PRIVATE KEY-----\n"]]
        {
            let mut s = StreamRedactor::new(&r);
            let mut out = s.push(key.as_bytes());
            for line in tail {
                out.push_str(&s.push(line.as_bytes()));
            }
            out.push_str(&s.push(b"after\n"));
            out.push_str(&s.finish());
            assert_eq!(out, "[REDACTED]\nafter\n", "{tail:?}");
        }
        // A stray BEGIN line before header-like lines (an HTTP dump): they end no key.
        let mut dump = String::from("-----BEGIN RSA PRIVATE KEY-----\n");
        while dump.len() < 70 * 1024 {
            dump.push_str("Content-Type: text/plain\n");
        }
        let mut s = StreamRedactor::new(&r);
        s.push(dump.as_bytes());
        assert_eq!(s.push(b"Accept: */*\nOK\n"), "Accept: */*\nOK\n");
        // A key's body on one line longer than the hold, after its headers: dropped whole.
        let long = format!(
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: 1\n\n{}\n=Qs3J\n-----END PGP PRIVATE KEY BLOCK-----\nafter\n",
            "TG9uZw".repeat(40_000)
        );
        for chunk_size in [4096, 70_000] {
            let mut s = StreamRedactor::new(&r);
            let mut out = String::new();
            for chunk in long.as_bytes().chunks(chunk_size) {
                out.push_str(&s.push(chunk));
                assert!(s.held.len() <= STREAM_HOLD + chunk_size, "held {} bytes", s.held.len());
            }
            out.push_str(&s.finish());
            assert_eq!(out, "[REDACTED]\nafter\n", "chunks of {chunk_size}");
        }
        // Cut off after a short last line (no END, nothing after): still dropped.
        let mut s = StreamRedactor::new(&r);
        let mut out = s.push(format!("{key}AbCd3Q==\n").as_bytes());
        out.push_str(&s.finish());
        assert_eq!(out, "[REDACTED]\n");
    }

    /// A private key printed one line at a time leaves as one `[REDACTED]`: nothing of it
    /// is released before its END line.
    #[test]
    fn a_key_printed_line_by_line_is_held_until_it_ends() {
        let r = Redactor::new();
        let mut s = StreamRedactor::new(&r);
        assert_eq!(s.push(b"starting\n"), "starting\n");
        let lines: [&[u8]; 4] = [
            b"-----BEGIN OPENSSH PRIVATE KEY-----\n",
            b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAA\n",
            b"EbmRzYS1zaGEyLW5pc3RwMjU2AAAACG5pc3\n",
            b"-----END OPENSSH PRIVATE KEY-----\n",
        ];
        for l in &lines[..3] {
            assert_eq!(s.push(l), "", "held while the key is open");
        }
        let out = s.push(lines[3]);
        assert_eq!(out, "[REDACTED]\n");
        assert_eq!(s.push(b"done\n"), "done\n");
    }

    /// A large text is redacted in segments: the result is the same as line by line,
    /// a key across a segment boundary included.
    #[test]
    fn a_large_text_is_redacted_like_its_parts() {
        let r = Redactor::new();
        let mut big = String::new();
        let mut i = 0;
        while big.len() < 300 * 1024 {
            let (_, text, _) = SECRETS[i % SECRETS.len()];
            big.push_str(&format!("line {i} of filler text for the segmenter\n{text}\n"));
            i += 1;
        }
        let out = r.redact(&big);
        for (f, t, part) in SECRETS {
            assert!(!out.contains(part), "{f} {t:?} survived in a large text");
        }
        assert!(out.contains("line 0 of filler") && out.contains(&format!("line {} of filler", i - 1)));
    }

    /// A single line longer than the stream's hold (minified JSON) is released in parts,
    /// never cutting through a secret, wherever it sits.
    #[test]
    fn a_long_line_is_released_without_halving_a_secret() {
        let r = Redactor::new();
        for offset in [30_000usize, 32_700, 32_760, 32_768, 32_780, 40_000, 65_000, 98_000] {
            let mut line = String::from("{");
            while line.len() < offset {
                line.push_str("\"field\":12345,");
            }
            line.push_str("\"password\":\"hunter2hunter2hunter2\",");
            while line.len() < 140_000 {
                line.push_str("\"field\":12345,");
            }
            line.push_str("\"end\":1}\n");
            let mut s = StreamRedactor::new(&r);
            let mut out = String::new();
            for chunk in line.as_bytes().chunks(4096) {
                out.push_str(&s.push(chunk));
            }
            out.push_str(&s.finish());
            assert!(!out.contains("hunter2"), "a secret at {offset} left a long line in pieces");
            assert!(out.contains("\"password\":\"[REDACTED]\""), "at {offset}");
            assert_eq!(out.len(), line.len() - "hunter2hunter2hunter2".len() + MARK.len());
        }
    }
}
