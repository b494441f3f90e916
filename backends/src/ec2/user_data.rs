//! The instance's user-data: a shell script cloud-init runs once, as root, at first boot.
//! It carries what the agent needs to register (A12): the platform URL, the workspace id
//! and the workspace's token (minted by the one shared function, J1), plus the inbound
//! secret; it writes them where the agent reads them and starts the runtime image.
//!
//! The script holds secrets: the platform never logs it, and only EC2 (DescribeInstance
//! Attribute, the instance's metadata service) gives it back — to whoever may read the
//! account's instances anyway. Every value is quoted ([`crate::shell::quote`]).

use crate::StartSpec;
use crate::shell::quote;

/// Where the agent's environment is written on the instance.
pub const ENV_FILE: &str = "/etc/molecule/workspace.env";
/// The agent's container on the instance (rescue reads its logs).
pub const AGENT_CONTAINER: &str = "molecule-agent";

/// The user-data for `spec`: `config_dir` is where the secrets go (mounted into the
/// agent at /configs), `agent_port` where the agent listens. The agent's container is
/// confined as on the Docker backend ([`crate::isolation`]): every capability dropped but
/// its runtime's few, no-new-privileges, the tier's memory/CPU/process limits, and the
/// runtime's user (who then owns the config directory).
pub fn render(spec: &StartSpec, config_dir: &str, agent_port: u16, limits: &crate::isolation::TierLimits) -> String {
    let secrets = spec.secrets();
    let profile = crate::isolation::profile(&spec.runtime);
    let l = limits.of(spec.tier);
    let mut confine = vec![
        "--cap-drop ALL".to_string(),
        "--security-opt no-new-privileges:true".to_string(),
        format!("--memory {m}m --memory-swap {m}m", m = l.memory_mb),
        // Never more than the instance has: Docker refuses to start the container then.
        r#"--cpus "$CPUS""#.to_string(),
        format!("--pids-limit {}", l.pids),
    ];
    confine.extend(profile.cap_add.iter().map(|c| format!("--cap-add {c}")));
    let owner = match profile.user {
        Some((uid, gid)) => {
            confine.push(format!("--user {uid}:{gid}"));
            format!("chown -R {uid}:{gid} \"$CONFIG_DIR\"\n")
        }
        None => String::new(),
    };
    let confine = confine.join(" ");
    let mut env: Vec<String> =
        spec.env().into_iter().filter(|(k, _)| k != "AGENT_PORT" && k != "AGENT_URL").map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("AGENT_PORT={agent_port}"));
    env.push("CONFIG_DIR=/configs".into());
    let env_lines: String = env.iter().map(|line| format!("    printf '%s\\n' {}\n", quote(line))).collect();
    format!(
        r#"#!/bin/sh
# Molecule workspace {ws}: bootstrap written by the platform. It holds the workspace's
# token: never print it.
set -eu
umask 077
CONFIG_DIR={config_dir}
mkdir -p "$CONFIG_DIR"
chmod 0700 "$CONFIG_DIR"
printf '%s' {token} > "$CONFIG_DIR/.auth_token"
printf '%s' {inbound} > "$CONFIG_DIR/.platform_inbound_secret"
{owner}# The URL the agent registers: this instance's private address (IMDSv2), the one the
# platform recorded for it at launch.
IMDS=http://169.254.169.254/latest
IP=$(curl -fsS -m 5 -H "X-aws-ec2-metadata-token: $(curl -fsS -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$IMDS/api/token")" "$IMDS/meta-data/local-ipv4" || true)
mkdir -p {env_dir}
{{
{env_lines}    if [ -n "$IP" ]; then printf 'AGENT_URL=http://%s:%s\n' "$IP" {agent_port}; fi
}} > {env_file}
CPUS=$(awk -v want={cpus} -v have="$(nproc)" 'BEGIN {{ print (want > have) ? have : want }}')
docker rm -f {agent} >/dev/null 2>&1 || true
docker run -d --name {agent} --restart unless-stopped --network host {confine} \
    --env-file {env_file} -v "$CONFIG_DIR:/configs" {image}
"#,
        ws = spec.workspace_id,
        config_dir = quote(config_dir),
        token = quote(secrets.token()),
        inbound = quote(secrets.inbound_secret()),
        env_dir = quote(ENV_FILE.rsplit_once('/').map(|(d, _)| d).unwrap_or("/etc")),
        env_file = quote(ENV_FILE),
        agent = AGENT_CONTAINER,
        image = quote(&spec.image),
        owner = owner,
        confine = confine,
        cpus = l.cpus,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use molecule_domain::tokens::MintedSecrets;
    use molecule_domain::{OrgId, WorkspaceId};

    fn spec(image: &str) -> StartSpec {
        StartSpec::new(
            WorkspaceId::new(),
            OrgId(uuid::Uuid::new_v4()),
            None,
            "echo".into(),
            image.into(),
            "http://platform.example:8080".into(),
            MintedSecrets::for_tests("mol_ws_0123", "inbound-456"),
        )
    }

    #[test]
    fn it_is_valid_sh_and_carries_what_the_agent_needs() {
        let s = spec("registry.example/echo:1");
        let script = render(&s, "/configs", 8000, &Default::default());
        assert!(script.len() < 16 * 1024, "EC2 caps user-data at 16 KiB");
        let check = std::process::Command::new("sh").arg("-n").arg("-c").arg(&script).output().unwrap();
        assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
        assert!(script.contains("printf '%s' mol_ws_0123 > \"$CONFIG_DIR/.auth_token\""), "{script}");
        assert!(script.contains("printf '%s' inbound-456 > \"$CONFIG_DIR/.platform_inbound_secret\""));
        assert!(script.contains(&format!("WORKSPACE_ID={}", s.workspace_id)));
        assert!(script.contains("PLATFORM_URL=http://platform.example:8080"));
        assert!(script.contains("AGENT_PORT=8000"));
        // Confined as on Docker: the echo runtime runs as 65532 with no capability, tier
        // 2's limits by default.
        assert!(
            script.contains(
                "--cap-drop ALL --security-opt no-new-privileges:true --memory 512m --memory-swap 512m --cpus \"$CPUS\" --pids-limit 256"
            ),
            "{script}"
        );
        assert!(script.contains("--user 65532:65532") && script.contains("chown -R 65532:65532 \"$CONFIG_DIR\""));
        assert!(!script.contains("--cap-add"));
        // The tier's CPUs, capped at the instance's.
        let cpus = |script: &str| {
            let line = script.lines().find(|l| l.starts_with("CPUS=")).expect("a CPUS line");
            let out = std::process::Command::new("sh").arg("-c").arg(format!("{line}; echo \"$CPUS\"")).output().unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        assert_eq!(cpus(&script), "0.5");
        let many = crate::isolation::TierLimits::parse("2=512/200/256").unwrap();
        let have = String::from_utf8(std::process::Command::new("nproc").output().unwrap().stdout).unwrap().trim().to_string();
        assert_eq!(cpus(&render(&s, "/configs", 8000, &many)), have);
    }

    #[test]
    fn a_hostile_value_stays_a_value() {
        let s = spec("img'; touch /tmp/pwned; echo '");
        let script = render(&s, "/configs dir$(x)", 8000, &Default::default());
        let check = std::process::Command::new("sh").arg("-n").arg("-c").arg(&script).output().unwrap();
        assert!(check.status.success());
        assert!(script.contains("'img'\\''; touch /tmp/pwned; echo '\\'''"), "{script}");
        assert!(script.contains("CONFIG_DIR='/configs dir$(x)'"));
    }
}
