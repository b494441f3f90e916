//! X4: the one secret redactor. Everything that leaves a workspace into storage or logs
//! goes through [`Redactor::redact`] (whole texts) or a [`StreamRedactor`] (output as it
//! arrives). Matches are replaced whole — never a prefix of a secret survives — with
//! `[REDACTED]`; the names of headers and keys stay, so the text stays readable. The rules
//! are in [`rules`], by family; the corpus tests below pin every family and a corpus of
//! harmless text that must come through byte for byte. Redact before truncating: a cut
//! secret no longer looks like one.

mod rules;

use regex::{Regex, RegexSet};
use std::borrow::Cow;

pub use rules::Scope;

pub const MARK: &str = "[REDACTED]";

#[derive(Clone)]
pub struct Redactor {
    /// Which rules match at all: one pass over text that holds no secret (most text).
    set: RegexSet,
    rules: Vec<(Regex, Scope, &'static str)>,
}

/// Values a secret-named key may have that are not secrets: references to other config
/// (`${DB_PASSWORD}`, `$TOKEN` — a whole reference, not `$uperS3cret`), placeholders,
/// booleans, short numbers (`max_tokens: 4096`; an 8-digit PIN is a secret).
fn harmless_value(v: &str) -> bool {
    static REFERENCE: std::sync::LazyLock<Regex> =
        std::sync::LazyLock::new(|| Regex::new(r"^\$(?:\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Z_][A-Z0-9_]*)$").expect("reference pattern"));
    let v = v.trim();
    v.is_empty()
        || v == MARK
        || REFERENCE.is_match(v)
        || v.starts_with('<') && v.ends_with('>')
        || (v.len() < 6 && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        || ["true", "false", "null", "none", "nil", "undefined", "required", "optional", "***", "xxx"]
            .contains(&v.to_ascii_lowercase().as_str())
}

/// The process's redactor, compiled once (a clone shares the compiled rules).
pub fn shared() -> &'static Redactor {
    static SHARED: std::sync::LazyLock<Redactor> = std::sync::LazyLock::new(Redactor::new);
    &SHARED
}

impl Redactor {
    pub fn new() -> Redactor {
        // Each pattern is a literal known to compile; a typo fails the unit tests.
        let rules: Vec<(Regex, Scope, &'static str)> = rules::all()
            .into_iter()
            .map(|r| (Regex::new(&rules::expand(r.pattern)).expect("redactor pattern"), r.scope, r.family))
            .collect();
        let set = RegexSet::new(rules.iter().map(|(re, _, _)| re.as_str())).expect("redactor pattern set");
        Redactor { set, rules }
    }

    /// The rule families, in the order they apply.
    pub fn families(&self) -> Vec<&'static str> {
        let mut f: Vec<&'static str> = self.rules.iter().map(|(_, _, f)| *f).collect();
        f.dedup();
        f
    }

    /// Redacts a text. A large one is redacted a segment at a time (cut at line ends,
    /// never inside a private key block), so the rules that match run over the few
    /// segments that hold secrets rather than over the whole text once each.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if text.len() <= SEGMENT {
            return self.redact_segment(text);
        }
        if !self.set.is_match(text) {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while !rest.is_empty() {
            let (segment, after) = rest.split_at(segment_end(rest));
            out.push_str(&self.redact_segment(segment));
            rest = after;
        }
        Cow::Owned(out)
    }

    /// Where rules match in `text` (whole matches, names included), in no order.
    pub fn spans(&self, text: &str) -> Vec<(usize, usize)> {
        self.set.matches(text).iter().flat_map(|i| self.rules[i].0.find_iter(text).map(|m| (m.start(), m.end()))).collect()
    }

    fn redact_segment<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let matched = self.set.matches(text);
        if !matched.matched_any() {
            return Cow::Borrowed(text);
        }
        let mut out = text.to_string();
        for i in matched.iter() {
            let (re, scope, family) = &self.rules[i];
            // Spans to replace, found on the text as it is now (an earlier rule may have
            // replaced part of what this one matched).
            let spans: Vec<(usize, usize)> = re
                .captures_iter(&out)
                .filter_map(|c| match scope {
                    Scope::Whole => c.get(0).map(|m| (m.start(), m.end())),
                    Scope::Value => c.name("value").filter(|v| !harmless_value(v.as_str())).map(|v| (v.start(), v.end())),
                })
                .collect();
            if spans.is_empty() {
                continue;
            }
            metrics::counter!(REDACTIONS, "family" => *family).increment(spans.len() as u64);
            let mut next = String::with_capacity(out.len());
            let mut at = 0;
            for (a, b) in spans {
                next.push_str(&out[at..a]);
                next.push_str(MARK);
                at = b;
            }
            next.push_str(&out[at..]);
            out = next;
        }
        Cow::Owned(out)
    }
}

/// Secrets replaced, per rule family (a counter; the exporter lives in the API crate).
pub const REDACTIONS: &str = "molecule_redactions_total";

/// Size of the segments a large text is redacted in.
const SEGMENT: usize = 64 * 1024;

/// Where the first segment of `text` ends: after the last line end within [`SEGMENT`]
/// (or the first one after it, for a longer line), and never inside a private key block
/// — nor among the body lines of one whose BEGIN line is not there (a log's tail): those
/// are known for a key only at their END line.
fn segment_end(text: &str) -> usize {
    if text.len() <= SEGMENT {
        return text.len();
    }
    let bytes = text.as_bytes();
    let mut cut = match bytes[..SEGMENT].iter().rposition(|b| *b == b'\n') {
        Some(p) => p + 1,
        None => bytes[SEGMENT..].iter().position(|b| *b == b'\n').map(|p| SEGMENT + p + 1).unwrap_or(bytes.len()),
    };
    if open_private_key(&bytes[..cut]).is_some() {
        // Through the block's END line (or to the end, if it never ends).
        cut = match bytes[cut..].windows(8).position(|w| w == b"-----END") {
            Some(p) => bytes[cut + p..].iter().position(|b| *b == b'\n').map(|q| cut + p + q + 1).unwrap_or(bytes.len()),
            None => bytes.len(),
        };
    }
    match key_body_end(bytes, cut) {
        (_, Some(marker)) => bytes[marker..].iter().position(|b| *b == b'\n').map(|p| marker + p + 1).unwrap_or(bytes.len()),
        (body, None) => body,
    }
}

/// The lines of a key's body from `at` on (base64 only; the buffer's end ends a line):
/// where they end and, if an END line follows them, where its `-----END …-----` ends.
fn key_body_end(buf: &[u8], mut at: usize) -> (usize, Option<usize>) {
    while at < buf.len() {
        let end = buf[at..].iter().position(|b| *b == b'\n').map(|p| at + p + 1).unwrap_or(buf.len());
        let line = &buf[at..end];
        let start = at + line.len() - line.trim_ascii_start().len();
        if buf[start..end].starts_with(b"-----END") {
            let close = buf[start + 8..end].windows(5).position(|w| w == b"-----").map(|p| start + 8 + p + 5).unwrap_or(end);
            return (at, Some(close));
        }
        let body = line.trim_ascii();
        if body.is_empty() || !body.iter().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)) {
            break;
        }
        at = end;
    }
    (at, None)
}

/// Most text a [`StreamRedactor`] holds back waiting for a line's end, and most of a
/// private key it holds waiting for the key's END line.
pub const STREAM_HOLD: usize = 64 * 1024;

/// Redacts a stream as it arrives without letting a secret out in pieces: a chunk is
/// released only up to its last complete line (tokens never span lines), and an armoured
/// private key is held from its BEGIN line until its END line arrives — so a key printed
/// one line per second leaves as one `[REDACTED]`, never line by line. A key larger than
/// [`STREAM_HOLD`] (or a stray BEGIN line) leaves redacted as a key cut short, and if its
/// body lines ran up to there, its further body lines are dropped through its END line —
/// up to the first line that is not of a key's body, which comes through. A line longer
/// than [`STREAM_HOLD`] is released at a space once that much has piled up.
pub struct StreamRedactor<'r> {
    redactor: &'r Redactor,
    held: Vec<u8>,
    /// Inside a key whose beginning has left (redacted): where in it, its lines dropped.
    in_key: Option<KeyPart>,
}

/// Where a stream is inside a private key whose beginning has left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyPart {
    /// Its header lines (`Version: …`, `Proc-Type: …`) and the blank line after them.
    Headers,
    /// Its full body lines, all this long. A shorter line may be its last (a PEM body's
    /// last line, PGP's `=Qs3J` checksum, up to two): one is the key's only if its END
    /// line follows, so it is held until the line after it shows which.
    Body(usize),
    /// Inside a body line longer than the hold, dropped in parts.
    Long,
}

/// What the lines from some point on are, for a key a stream is inside.
enum KeyLines {
    /// The key's, through its END line's `-----END …-----`, which ends here.
    Ended(usize),
    /// The key's up to here; the line here (or a short line held before it) is not.
    Left(usize),
    /// The key's up to here, then (up to two) short lines that may be its last: the text
    /// ran out before it showed which, and the key is at this part.
    Open(KeyPart, usize),
}

/// Reads the lines of `buf` from `at` on (its end ends a line) as those of a key at `part`.
fn key_lines(buf: &[u8], mut at: usize, mut part: KeyPart) -> KeyLines {
    let is_base64 = |l: &[u8]| !l.is_empty() && l.iter().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b));
    let is_header = |l: &[u8]| match l.windows(2).position(|w| w == b": ") {
        Some(p) => l[0].is_ascii_alphabetic() && l[..p].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-'),
        None => false,
    };
    let mut known = at;
    let mut short = 0;
    while at < buf.len() {
        let end = buf[at..].iter().position(|b| *b == b'\n').map(|p| at + p + 1).unwrap_or(buf.len());
        let line = buf[at..end].trim_ascii();
        if line.starts_with(b"-----END") {
            let start = end - buf[at..end].trim_ascii_start().len();
            let close = buf[start + 8..end].windows(5).position(|w| w == b"-----").map(|p| start + 8 + p + 5).unwrap_or(end);
            // The rest of the END line goes too when it is blank: the key left as a line.
            return KeyLines::Ended(if buf[close..end].trim_ascii().is_empty() { end } else { close });
        }
        match part {
            KeyPart::Headers if line.is_empty() || is_header(line) => {}
            // A key's body lines are long (64 characters for PEM and PGP, 70 for OpenSSH).
            KeyPart::Headers if is_base64(line) && line.len() >= 16 => part = KeyPart::Body(line.len()),
            KeyPart::Long if line.is_empty() || is_base64(line) => part = KeyPart::Body(usize::MAX),
            KeyPart::Body(width) if is_base64(line) && line.len() == width && short == 0 => {}
            KeyPart::Body(width) if is_base64(line) && line.len() < width && short < 2 => {
                short += 1;
                at = end;
                continue;
            }
            _ => return KeyLines::Left(known),
        }
        at = end;
        known = at;
    }
    KeyLines::Open(part, known)
}

impl<'r> StreamRedactor<'r> {
    pub fn new(redactor: &'r Redactor) -> Self {
        StreamRedactor { redactor, held: Vec::new(), in_key: None }
    }

    /// Takes a chunk; returns the redacted text that may leave now (possibly empty).
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.held.extend_from_slice(chunk);
        let line_end = |held: &[u8]| held.iter().rposition(|b| *b == b'\n').map(|p| p + 1).unwrap_or(0);
        if let Some(part) = self.in_key {
            let limit = line_end(&self.held);
            self.drop_key_lines(part, limit);
        }
        if self.in_key.is_some() {
            // What is held is a line not yet ended, after the short lines that may be the
            // key's last: held until a line shows whether they are. A body line longer
            // than the hold is dropped in parts; any other line that long is not the key's.
            let long_body = matches!(self.in_key, Some(KeyPart::Headers | KeyPart::Long))
                || matches!(self.in_key, Some(KeyPart::Body(width)) if width > STREAM_HOLD);
            if self.held.len() <= STREAM_HOLD {
                return String::new();
            } else if long_body && self.held.iter().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)) {
                self.held.clear();
                self.in_key = Some(KeyPart::Long);
                return String::new();
            }
            self.in_key = None;
        }
        let last_line_end = line_end(&self.held);
        let mut cut = last_line_end;
        if let Some(open) = open_private_key(&self.held) {
            // Held until its END line — by the key's own size, not the buffer's (a batch
            // of output may end mid-key): past the hold (a stray BEGIN line, or a key
            // larger than any real one) its lines so far leave redacted as a key cut short
            // and the rest of its body is dropped, so the hold stays bounded — only if its
            // body lines run up to the cut: a stray BEGIN line's ordinary lines end it.
            if self.held.len() - open <= STREAM_HOLD {
                cut = cut.min(open);
            } else if cut > open {
                let begin_end = self.held[open..].iter().position(|b| *b == b'\n').map_or(cut, |p| open + p + 1);
                match key_lines(&self.held[..cut], begin_end, KeyPart::Headers) {
                    // No body line yet: a key's only if one longer than the hold is under way
                    // (a real key's few header lines do not fill the hold).
                    KeyLines::Open(KeyPart::Headers, _)
                        if self.held.len() - cut <= STREAM_HOLD / 2
                            || !self.held[cut..].iter().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)) => {}
                    KeyLines::Open(part, known) => {
                        // Short lines that may be its last stay held, to be dropped with it.
                        self.in_key = Some(part);
                        cut = known;
                    }
                    _ => {}
                }
            }
        }
        if cut == 0 && self.held.len() > STREAM_HOLD {
            return self.release_long_line();
        }
        if cut == 0 {
            return String::new();
        }
        let out: Vec<u8> = self.held.drain(..cut).collect();
        if self.in_key.is_some() {
            // The key's rule takes the line end after its last line: the line stays one.
            let mut text = self.text(&out[..out.len() - 1]);
            text.push('\n');
            return text;
        }
        self.text(&out)
    }

    /// A line longer than the hold: release all but its last half-hold, cut where no
    /// match of any rule straddles the cut — the kept half is longer than any secret, so
    /// one that starts before the cut is whole in the buffer and seen.
    fn release_long_line(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.held).replace('\0', "\u{FFFD}");
        let mut cut = text.len() - STREAM_HOLD / 2;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        for (start, end) in self.redactor.spans(&text) {
            if start < cut && cut < end {
                cut = start;
            }
        }
        let out = self.redactor.redact(&text[..cut]).into_owned();
        self.held = text.as_bytes()[cut..].to_vec();
        out
    }

    /// Drops the lines of the key the stream is inside (through its END line) that start
    /// the held text, within `limit`; the key ends at its END line or at a line not of it.
    fn drop_key_lines(&mut self, part: KeyPart, limit: usize) {
        let (drop, part) = match key_lines(&self.held[..limit], 0, part) {
            KeyLines::Ended(end) => (end, None),
            KeyLines::Left(known) => (known, None),
            KeyLines::Open(part, known) => (known, Some(part)),
        };
        self.in_key = part;
        self.held.drain(..drop);
    }

    /// The rest, at the stream's end (a key cut off before its END is still redacted:
    /// short lines that may be its last go with it, nothing having shown they are not).
    pub fn finish(mut self) -> String {
        if let Some(part) = self.in_key {
            self.drop_key_lines(part, self.held.len());
            if self.in_key.is_some() {
                self.held.clear();
            }
        }
        let rest = std::mem::take(&mut self.held);
        self.text(&rest)
    }

    fn text(&self, bytes: &[u8]) -> String {
        // PostgreSQL text cannot hold NUL: shown as U+FFFD, like other undecodable bytes.
        let lossy = String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}");
        self.redactor.redact(&lossy).into_owned()
    }
}

/// Where a private key block that has not ended yet begins (its BEGIN line), if any.
fn open_private_key(buf: &[u8]) -> Option<usize> {
    let find_last = |needle: &[u8]| buf.windows(needle.len()).rposition(|w| w == needle);
    let begin = find_last(b"-----BEGIN")?;
    let line_end = buf[begin..].iter().position(|b| *b == b'\n').map(|p| begin + p).unwrap_or(buf.len());
    let is_key = buf[begin..line_end].windows(11).any(|w| w == b"PRIVATE KEY");
    let ended = buf[begin..].windows(8).any(|w| w == b"-----END");
    (is_key && !ended).then(|| buf[..begin].iter().rposition(|b| *b == b'\n').map(|p| p + 1).unwrap_or(0))
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

/// Real-looking secrets of every family and harmless text: the redactor's test corpus,
/// also replayed end to end by the integration tests.
#[cfg(any(test, feature = "testing"))]
pub mod corpus;
