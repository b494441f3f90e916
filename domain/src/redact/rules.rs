//! The redactor's rules, by family, modelled on the rule sets of gitleaks, trufflehog and
//! GitHub secret scanning: provider tokens by their published formats, JWTs, HTTP
//! authorization and API-key headers, credentials in URLs, private keys of every armoured
//! kind (truncated ones included), and the values of secret-named keys in `key=value`,
//! `key: value`, JSON, YAML, XML, env and command-line forms.
//!
//! A rule either removes its whole match (a token is a secret from its first character)
//! or only its `value` group (a header's name or a key's name stays, so text stays
//! readable).

/// What a rule replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole match.
    Whole,
    /// Only the capture group named `value`.
    Value,
}

pub struct Rule {
    pub family: &'static str,
    pub pattern: &'static str,
    pub scope: Scope,
}

const fn whole(family: &'static str, pattern: &'static str) -> Rule {
    Rule { family, pattern, scope: Scope::Whole }
}

const fn value(family: &'static str, pattern: &'static str) -> Rule {
    Rule { family, pattern, scope: Scope::Value }
}

/// Names of keys whose values are secrets (with any prefix or suffix: `DB_PASSWORD`,
/// `aws_secret_access_key`, `slackBotToken`, `x-api-key` …).
///
/// Not `pwd` (the shell's working directory, in every `env`) nor `sas` (Arkansas): SAS
/// tokens are caught by their `sig=`.
const SECRET_KEY: &str = r"[A-Za-z0-9_.\-]*(?:passw(?:or)?d|passphrase|secret|token|api[_\-.]?key|access[_\-.]?key|private[_\-.]?key|signing[_\-.]?key|encryption[_\-.]?key|master[_\-.]?key|session[_\-.]?key|credentials?|auth[_\-.]?key|connection[_\-.]?string)(?i:s)?";

pub fn all() -> Vec<Rule> {
    vec![
        // --- Private keys: PEM, OpenSSH, PGP. A block runs to its END line, or — cut off
        // by a cap or a stream — through every line that can still belong to it (headers
        // first: the alternation takes the first branch that lets the whole match end).
        whole(
            "private_key",
            r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----(?:(?:\r?\n|\\r?\\n)[ \t]*(?:[A-Za-z][A-Za-z0-9-]*: [^\r\n]*|[A-Za-z0-9+/=]*)[ \t]*)*(?:(?:\r?\n|\\r?\\n)?[ \t]*-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----)?",
        ),
        // A key whose beginning was cut off (the tail of a log): its body lines up to its
        // END line — full-length lines, then up to two short ones (a body's last line, and
        // PGP's `=Qs3J` checksum), so a word on the line above the key stays. A tail cut
        // by size starts inside a line: a short first line before full-length ones, or
        // the short last lines alone, has no line above to tell it by: it goes too.
        whole(
            "private_key",
            r"(?m)(?:(?:\A[ \t]*[A-Za-z0-9+/=]+[ \t]*\r?\n)?(?:^[ \t]*[A-Za-z0-9+/=]{16,}[ \t]*\r?\n)+(?:^[ \t]*[A-Za-z0-9+/=]+[ \t]*\r?\n){0,2}|\A(?:[ \t]*[A-Za-z0-9+/=]+[ \t]*\r?\n){1,2})[ \t]*-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----",
        ),
        // --- Provider tokens.
        whole("aws", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|ABIA|ACCA)[0-9A-Z]{16}\b"),
        whole("github", r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}\b"),
        whole("github", r"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
        whole("gitlab", r"\bgl(?:pat|ptt|dt|rt|cbt|imt|oas|soat|ft|agent|wt)-[A-Za-z0-9_\-]{20,}"),
        whole("slack", r"\bxox[abposre]-[A-Za-z0-9\-]{10,}"),
        whole("slack", r"\bxapp-\d-[A-Za-z0-9\-]{10,}"),
        whole("slack", r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/_\-]+"),
        whole("discord", r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[A-Za-z0-9_\-]+"),
        whole("stripe", r"\b(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}\b"),
        whole("stripe", r"\bwhsec_[A-Za-z0-9]{20,}\b"),
        whole("openai_anthropic", r"\bsk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-)?[A-Za-z0-9_\-]{16,}"),
        whole("google", r"\bAIza[0-9A-Za-z_\-]{35}\b"),
        whole("google", r"\bGOCSPX-[A-Za-z0-9_\-]{20,}"),
        whole("google", r"\bya29\.[0-9A-Za-z_\-]{20,}"),
        whole("azure", r"\b[A-Za-z0-9_~.]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}"),
        whole("npm", r"\bnpm_[A-Za-z0-9]{36}\b"),
        whole("pypi", r"\bpypi-AgE[A-Za-z0-9_\-]{50,}"),
        whole("huggingface", r"\bhf_[A-Za-z]{30,}\b"),
        whole("sendgrid", r"\bSG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"),
        whole("twilio", r"\bSK[0-9a-fA-F]{32}\b"),
        whole("mailgun", r"\bkey-[0-9a-zA-Z]{32}\b"),
        whole("digitalocean", r"\bdo[por]_v1_[a-f0-9]{64}\b"),
        whole("shopify", r"\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}\b"),
        whole("databricks", r"\bdapi[a-f0-9]{32}(?:-\d)?\b"),
        whole("telegram", r"\b\d{8,10}:AA[A-Za-z0-9_\-]{33}\b"),
        whole("molecule", r"\bmol_(?:org|ws|pis)_[0-9a-f]{16,}\b"),
        // --- JSON web tokens (header and payload are base64url JSON: `eyJ`).
        whole("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
        // --- HTTP authorization: every scheme's credentials, to the end of the value
        // (Digest's quoted parameters to the end of the line).
        value("http_auth", r#"(?i)\b(?:proxy-)?authorization["']?\s*[:=]\s*["']?(?P<value>digest\s[^\r\n]+)"#),
        value("http_auth", r#"(?i)\b(?:proxy-)?authorization["']?\s*[:=]\s*["']?(?P<value>[^\r\n"']{4,})"#),
        value("http_auth", r"(?i)\b(?:bearer|token)\s+(?P<value>[A-Za-z0-9\-._~+/]{16,}=*)"),
        value(
            "api_key_header",
            r#"(?i)\b(?:x-api-key|x-auth-token|x-access-token|api-key|x-goog-api-key|ocp-apim-subscription-key|private-token|x-vault-token|x-amz-security-token|x-csrf-token)["']?\s*[:=]\s*["']?(?P<value>[^\s"',;]{4,})"#,
        ),
        // --- Credentials in URLs and DSNs: scheme://user:password@host.
        value("url_credentials", r"(?i)\b[a-z][a-z0-9+.\-]*://[^/\s:@]*:(?P<value>[^\s]+)@[A-Za-z0-9.\-\[\]:]+"),
        // --- Connection strings: Azure storage, Service Bus, ADO.NET.
        value("connection_string", r"(?i)\b(?:AccountKey|SharedAccessKey|SharedAccessSignature)=(?P<value>[^;\s\x22']+)"),
        // Password/Pwd only inside a connection string (after a `;`): a bare `PWD=/home`
        // is the shell's working directory.
        value("connection_string", r"(?i);\s*(?:Password|Pwd)=(?P<value>[^;\x22'\r\n]+)"),
        value("connection_string", r"(?i)[?&]sig=(?P<value>[A-Za-z0-9%+/=]{16,})"),
        // --- Secret-named keys. Quoted values may hold spaces; unquoted ones end at
        // whitespace or punctuation and must look like a secret (6+ characters, not only
        // digits) so prose such as "password: click the link" and counts such as
        // "max_tokens: 4096" pass.
        value(
            "secret_key_json",
            concat!(
                r#"(?i)"[A-Za-z0-9_.\-]*"#,
                r"(?:passw(?:or)?d|passphrase|pwd|secret|token|api[_\-.]?key|access[_\-.]?key|private[_\-.]?key|signing[_\-.]?key|client[_\-.]?secret|credentials?|auth[_\-.]?key)",
                r#"(?i:s)?"\s*:\s*"(?P<value>[^"]+)""#
            ),
        ),
        value(
            "secret_key_quoted",
            r#"(?i)(?:^|[^A-Za-z0-9])[A-Za-z0-9_.\-]*(?:passw(?:or)?d|passphrase|pwd|secret|token|api[_\-.]?key|access[_\-.]?key|private[_\-.]?key|signing[_\-.]?key|credentials?)\s*[=:]\s*"(?P<value>[^"\r\n]+)""#,
        ),
        value(
            "secret_key_quoted",
            r#"(?i)(?:^|[^A-Za-z0-9])[A-Za-z0-9_.\-]*(?:passw(?:or)?d|passphrase|pwd|secret|token|api[_\-.]?key|access[_\-.]?key|private[_\-.]?key|signing[_\-.]?key|credentials?)\s*[=:]\s*'(?P<value>[^'\r\n]+)'"#,
        ),
        value(
            "secret_key_xml",
            r"(?i)<(?P<tag>[A-Za-z0-9_.\-]*(?:password|passwd|secret|token|api[_\-]?key|private[_\-]?key))>(?P<value>[^<]{1,})</",
        ),
        value(
            "secret_key_flag",
            r"(?i)(?:^|\s)--?(?:password|passwd|token|secret|api-key|access-key|client-secret)(?:=|\s+)(?P<value>[^\s\x22']+)",
        ),
        value(
            "secret_key_flag",
            r#"(?i)(?:^|\s)--?(?:password|passwd|token|secret|api-key|access-key|client-secret)(?:=|\s+)"(?P<value>[^"\r\n]+)""#,
        ),
        value(
            "secret_key_flag",
            r"(?i)(?:^|\s)--?(?:password|passwd|token|secret|api-key|access-key|client-secret)(?:=|\s+)'(?P<value>[^'\r\n]+)'",
        ),
        // A secret-named YAML key at the start of a line: its value is the rest of the
        // line, spaces included (a trailing comment excepted). `key=value` lines are
        // logfmt as often as env files, so `=` values end at a space (below).
        value(
            "secret_key_line",
            "(?im)^[ \\t]*(?:- )?SECRET_KEY_PLACEHOLDER[ \\t]*:[ \\t]*(?P<value>[^\\s\"'#|>][^\\r\\n#]*?)[ \\t]*(?:#.*)?$",
        ),
        value("secret_key", "(?i)(?:^|[^A-Za-z0-9])(?:export\\s+)?SECRET_KEY_PLACEHOLDER\\s*[=:]\\s*(?P<value>[^\\s\"';&<>{}\\[\\]]{6,})"),
    ]
}

/// The secret-key rule's pattern with the key alternation filled in.
pub fn expand(pattern: &str) -> String {
    pattern.replace("SECRET_KEY_PLACEHOLDER", SECRET_KEY)
}
