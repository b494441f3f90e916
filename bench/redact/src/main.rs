//! The redactor's throughput (X4): MiB/s over log-like text with no secret, with a secret
//! every 200 lines, and through the streaming redactor in 4 KiB chunks. Prints one line:
//! `redact_clean_mib_s=… redact_mixed_mib_s=… stream_mib_s=…` (medians of the rounds).
//!
//! Usage: molecule-bench-redact [--mib N] [--rounds N]

use molecule_domain::redact::corpus::{HARMLESS, SECRETS};
use molecule_domain::redact::{Redactor, StreamRedactor};
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// About `bytes` of text: service-log lines and the harmless corpus, and every
/// `secret_every` lines (0: never) a line of the secrets corpus.
fn text(bytes: usize, secret_every: usize) -> String {
    let mut out = String::with_capacity(bytes + 1024);
    let mut i = 0usize;
    while out.len() < bytes {
        if secret_every > 0 && i % secret_every == secret_every - 1 {
            out.push_str(SECRETS[(i / secret_every) % SECRETS.len()].1);
        } else if i % 3 == 0 {
            out.push_str(HARMLESS[i % HARMLESS.len()]);
        } else {
            out.push_str(&format!(
                "2026-11-30T10:{:02}:{:02}.{:03}Z INFO request method=GET path=/v1/items/{} status=200 latency_ms={}.{} request_id=01J{:010}",
                (i / 60) % 60, i % 60, i % 1000, i * 7, i % 97, i % 10, i
            ));
        }
        out.push('\n');
        i += 1;
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mib = arg("--mib", 32);
    let rounds = arg("--rounds", 5);
    let r = Redactor::new();
    let clean = text(mib << 20, 0);
    let mixed = text(mib << 20, 200);
    let size = |t: &str| t.len() as f64 / (1 << 20) as f64;
    let mut results = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        let t = Instant::now();
        let out = r.redact(&clean);
        assert_eq!(out.len(), clean.len(), "clean text comes through unchanged");
        results[0].push(size(&clean) / t.elapsed().as_secs_f64());

        let t = Instant::now();
        let out = r.redact(&mixed);
        assert!(out.contains("[REDACTED]"));
        results[1].push(size(&mixed) / t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut s = StreamRedactor::new(&r);
        let mut n = 0;
        for chunk in mixed.as_bytes().chunks(4096) {
            n += s.push(chunk).len();
        }
        n += s.finish().len();
        assert!(n > 0);
        results[2].push(size(&mixed) / t.elapsed().as_secs_f64());
    }
    let [clean_r, mixed_r, stream_r] = results;
    println!("redact_clean_mib_s={:.1} redact_mixed_mib_s={:.1} stream_mib_s={:.1}", median(clean_r), median(mixed_r), median(stream_r));
}
