//! Image resolution (J1): runtime → image under `MOLECULE_IMAGE_REGISTRY`, a digest pin
//! when one is recorded, and whether a reference is a moving tag that must be re-pulled.

/// Where runtime images live unless `MOLECULE_IMAGE_REGISTRY` says otherwise.
pub const DEFAULT_REGISTRY: &str = "ghcr.io/molecule-ai";

/// The reference agent's image, built locally by `infra/build-agent-image.sh` (never
/// pulled: its tag is pinned).
pub const ECHO_IMAGE: &str = "molecule-local/echo-agent:v1";

const MOVING_TAGS: &[&str] = &["latest", "staging", "main", "dev", "edge", "nightly", "rolling"];

/// The registry prefix (no trailing slash).
pub fn registry_prefix(env_value: Option<&str>) -> String {
    match env_value.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => v.trim_end_matches('/').to_string(),
        None => DEFAULT_REGISTRY.to_string(),
    }
}

/// The image of a runtime, before pins.
pub fn runtime_image(registry: &str, runtime: &str) -> String {
    if runtime == "echo" {
        return ECHO_IMAGE.to_string();
    }
    format!("{registry}/workspace-template-{runtime}:latest")
}

/// The image with its tag replaced by a pinned digest (`<base>@sha256:<digest>`).
pub fn pinned(image: &str, sha256_hex: &str) -> String {
    format!("{}@sha256:{sha256_hex}", repository(image))
}

/// The repository part of a reference: without its tag or digest. A registry port
/// (`host:5000/repo`) is not a tag.
pub fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match tag_start(no_digest) {
        Some(i) => &no_digest[..i],
        None => no_digest,
    }
}

fn tag_start(reference: &str) -> Option<usize> {
    let last_slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
    reference[last_slash..].rfind(':').map(|i| last_slash + i)
}

/// The tag of a reference; None when it has none (or is pinned by digest).
pub fn tag(image: &str) -> Option<&str> {
    if image.contains('@') {
        return None;
    }
    tag_start(image).map(|i| &image[i + 1..])
}

/// Must this reference be pulled again even when present? Digests never; no tag or a
/// moving tag always.
pub fn is_moving(image: &str) -> bool {
    if image.contains('@') {
        return false;
    }
    match tag(image) {
        None => true,
        Some(t) => MOVING_TAGS.contains(&t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_classification_table() {
        let cases: &[(&str, bool, Option<&str>, &str)] = &[
            // (reference, moving, tag, repository)
            ("ghcr.io/molecule-ai/workspace-template-hermes:latest", true, Some("latest"), "ghcr.io/molecule-ai/workspace-template-hermes"),
            ("ghcr.io/molecule-ai/workspace-template-hermes", true, None, "ghcr.io/molecule-ai/workspace-template-hermes"),
            ("ghcr.io/molecule-ai/x:v1.2.3", false, Some("v1.2.3"), "ghcr.io/molecule-ai/x"),
            ("registry.local:5000/team/agent", true, None, "registry.local:5000/team/agent"),
            ("registry.local:5000/team/agent:staging", true, Some("staging"), "registry.local:5000/team/agent"),
            ("registry.local:5000/team/agent:2026-05-01", false, Some("2026-05-01"), "registry.local:5000/team/agent"),
            ("localhost:5000/agent:nightly", true, Some("nightly"), "localhost:5000/agent"),
            ("agent:main", true, Some("main"), "agent"),
            ("agent:dev", true, Some("dev"), "agent"),
            ("agent:edge", true, Some("edge"), "agent"),
            ("agent:rolling", true, Some("rolling"), "agent"),
            ("agent:devel", false, Some("devel"), "agent"),
            (
                "ghcr.io/molecule-ai/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                false,
                None,
                "ghcr.io/molecule-ai/x",
            ),
            (
                "ghcr.io/molecule-ai/x:latest@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                false,
                None,
                "ghcr.io/molecule-ai/x",
            ),
            (ECHO_IMAGE, false, Some("v1"), "molecule-local/echo-agent"),
        ];
        for (r, moving, t, repo) in cases {
            assert_eq!(is_moving(r), *moving, "moving({r})");
            assert_eq!(tag(r), *t, "tag({r})");
            assert_eq!(repository(r), *repo, "repository({r})");
        }
    }

    #[test]
    fn registry_prefix_and_pins() {
        assert_eq!(registry_prefix(None), DEFAULT_REGISTRY);
        assert_eq!(registry_prefix(Some("  ")), DEFAULT_REGISTRY);
        assert_eq!(registry_prefix(Some("123.dkr.ecr.us-east-1.amazonaws.com/molecule/")), "123.dkr.ecr.us-east-1.amazonaws.com/molecule");
        let img = runtime_image("registry.local:5000/m", "hermes");
        assert_eq!(img, "registry.local:5000/m/workspace-template-hermes:latest");
        let d = "ab".repeat(32);
        assert_eq!(pinned(&img, &d), format!("registry.local:5000/m/workspace-template-hermes@sha256:{d}"));
        assert!(!is_moving(&pinned(&img, &d)));
        assert_eq!(runtime_image("anything", "echo"), ECHO_IMAGE);
    }
}
