#!/usr/bin/env python3
"""Offline validation of the deployment files in infra/ (no cluster, no network).

- Kubernetes manifests (infra/k8s/*.yaml): core kinds against the JSON schemas of one
  pinned Kubernetes version that the `kubernetes-validate` package ships, in their strict
  form (an unknown field is an error, as `kubectl apply --validate=strict` makes it); KEDA
  kinds against the openAPIV3Schema of KEDA's own CRDs, vendored in infra/schemas/keda/
  (made strict the same way: an object that lists its properties takes no others, unless
  the CRD marks it x-kubernetes-preserve-unknown-fields); their metadata against
  Kubernetes' ObjectMeta.
- What no schema sees: references between the objects (Secret and ConfigMap keys, the
  Service's selector and port, each ScaledObject's Deployment and TriggerAuthentication),
  one Deployment and one ScaledObject per worker pool whose trigger query names that pool,
  non-root, read-only root filesystems, resource requests, one image everywhere, no
  namespace anywhere.
- infra/compose.yaml against the Compose specification's JSON schema (vendored in
  infra/schemas/compose-spec.json), and its depends_on conditions.
- infra/Dockerfile and .dockerignore: the few facts the other files rely on.
- With --molecule BIN: every command line in the manifests and the compose file is parsed
  by the real binary (`BIN <args> --help` must succeed), so a renamed subcommand or flag fails.

Prints a summary, or with --json the pools and their KEDA queries (tests/tests/deploy.rs
runs each query against a database). Exits 1 on any error, listing every one.

Run with the virtualenv tests/run.sh makes: ~/.cache/molecule-infra/bin/python infra/k8s/validate.py
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

try:
    import jsonschema
    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012
    import kubernetes_validate
except ImportError as e:  # pragma: no cover - the message is the point
    sys.exit(f"validate.py: {e}. Run it with the virtualenv tests/run.sh creates "
             f"(~/.cache/molecule-infra/bin/python), or: pip install 'kubernetes-validate==1.37.0'")

# The Kubernetes version whose API the manifests are checked against.
K8S_VERSION = "1.33.0"

INFRA = Path(__file__).resolve().parent.parent
REPO = INFRA.parent
K8S = INFRA / "k8s"
KEDA_CRDS = INFRA / "schemas" / "keda"
COMPOSE_SCHEMA = INFRA / "schemas" / "compose-spec.json"

POOL_LABEL = "molecule.platform/pool"
COMPONENT_LABEL = "app.kubernetes.io/component"
OBJECT_META = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
SUBCOMMANDS = {"serve", "api", "worker", "scheduler", "migrate"}


class Errors:
    def __init__(self):
        self.items = []

    def add(self, where, msg):
        self.items.append(f"{where}: {msg}")


# --- Kubernetes core kinds -------------------------------------------------------------

def k8s_schema_dir():
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    d = base / f"v{K8S_VERSION}-local-strict"
    if not d.is_dir():
        sys.exit(f"validate.py: kubernetes-validate {getattr(kubernetes_validate, '__version__', '?')} has no "
                 f"schemas for Kubernetes {K8S_VERSION} ({d})")
    return d


def core_schema_file(schema_dir, doc):
    # apps/v1 -> apps-v1, policy/v1 -> policy-v1, v1 -> v1 (as kubernetes-validate names them)
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    return schema_dir / f"{doc['kind'].lower()}-{api}.json"


def format_error(e):
    path = "/".join(str(p) for p in e.absolute_path) or "(top)"
    return f"{path}: {e.message}"


def validate_core(doc, schema_dir, defs_resource, where, errors):
    f = core_schema_file(schema_dir, doc)
    if not f.is_file():
        errors.add(where, f"no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {K8S_VERSION}")
        return
    # Each kind's schema has an $id under https://kubernetes.io/api/ and refers to
    # /api/_definitions.json, which is registered under its own $id.
    schema = json.loads(f.read_text())
    registry = defs_resource @ Registry()
    v = jsonschema.Draft202012Validator(schema, registry=registry)
    for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        errors.add(where, format_error(e))


# --- KEDA kinds (CRDs) -------------------------------------------------------------------

def strict_openapi(node):
    """A CRD's structural openAPIV3Schema as strict JSON Schema."""
    if isinstance(node, list):
        return [strict_openapi(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_openapi(v) for k, v in node.items()
           if k not in ("x-kubernetes-int-or-string", "nullable", "format")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def load_crds(errors):
    crds = {}
    for f in sorted(KEDA_CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd:
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if not v.get("served"):
                    continue
                schema = strict_openapi(v["schema"]["openAPIV3Schema"])
                # metadata: Kubernetes' ObjectMeta (the CRD only says "object").
                schema["properties"]["metadata"] = {"$ref": OBJECT_META}
                schema["$id"] = f"https://kubernetes.io/api/crd/{group}/{v['name']}/{kind}"
                schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
                crds[(f"{group}/{v['name']}", kind)] = schema
    if not crds:
        errors.add(str(KEDA_CRDS), "no CRD found")
    return crds


def validate_crd(doc, schema, defs_resource, where, errors):
    registry = defs_resource @ Registry()
    v = jsonschema.Draft202012Validator(schema, registry=registry)
    for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        errors.add(where, format_error(e))


# --- what no schema sees ---------------------------------------------------------------

def pod_spec(doc):
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"], doc["spec"]["template"]["metadata"].get("labels", {})
    if doc["kind"] == "Job":
        return doc["spec"]["template"]["spec"], doc["spec"]["template"]["metadata"].get("labels", {})
    return None, None


def check_references(objs, errors):
    by = {}
    for where, d in objs:
        by.setdefault(d["kind"], {})[d["metadata"]["name"]] = (where, d)

    def secret_has(name, key):
        s = by.get("Secret", {}).get(name)
        if not s:
            return False
        d = s[1]
        return key in (d.get("stringData") or {}) or key in (d.get("data") or {})

    def configmap_has(name, key=None):
        c = by.get("ConfigMap", {}).get(name)
        return bool(c) and (key is None or key in (c[1].get("data") or {}))

    images = set()
    for where, d in objs:
        if "namespace" in d["metadata"]:
            errors.add(where, "metadata.namespace is set: the manifests are namespace-agnostic (kubectl -n)")
        spec, labels = pod_spec(d)
        if spec is None:
            continue
        if d["kind"] == "Deployment":
            sel = d["spec"]["selector"].get("matchLabels", {})
            for k, v in sel.items():
                if labels.get(k) != v:
                    errors.add(where, f"selector {k}={v} does not match the pod template's labels")
        sa = spec.get("serviceAccountName")
        if sa and sa not in by.get("ServiceAccount", {}):
            errors.add(where, f"serviceAccountName {sa}: no such ServiceAccount")
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
            errors.add(where, "pod securityContext: runAsNonRoot true and a non-zero runAsUser are required")
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            cw = f"{where} container {c['name']}"
            images.add(c.get("image"))
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.add(cw, "readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.add(cw, "allowPrivilegeEscalation must be false")
            if "ALL" not in (sc.get("capabilities", {}).get("drop") or []):
                errors.add(cw, "capabilities must drop ALL")
            req = c.get("resources", {}).get("requests", {})
            if not req.get("cpu") or not req.get("memory"):
                errors.add(cw, "resources.requests.cpu and .memory are required")
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef and not configmap_has(ef["configMapRef"]["name"]):
                    errors.add(cw, f"envFrom configMap {ef['configMapRef']['name']}: no such ConfigMap")
                if "secretRef" in ef and ef["secretRef"]["name"] not in by.get("Secret", {}):
                    errors.add(cw, f"envFrom secret {ef['secretRef']['name']}: no such Secret")
            for e in c.get("env", []):
                vf = e.get("valueFrom", {})
                if "secretKeyRef" in vf and not secret_has(vf["secretKeyRef"]["name"], vf["secretKeyRef"]["key"]):
                    errors.add(cw, f"env {e['name']}: no key {vf['secretKeyRef']['key']} in Secret {vf['secretKeyRef']['name']}")
                if "configMapKeyRef" in vf and not configmap_has(vf["configMapKeyRef"]["name"], vf["configMapKeyRef"]["key"]):
                    errors.add(cw, f"env {e['name']}: no key {vf['configMapKeyRef']['key']} in ConfigMap {vf['configMapKeyRef']['name']}")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    errors.add(cw, f"volumeMount {m['name']}: no such volume")
            ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                hg = c.get(probe, {}).get("httpGet")
                if hg and hg["port"] not in ports:
                    errors.add(cw, f"{probe} port {hg['port']}: the container declares no such port")
            args = c.get("args") or []
            if not args or args[0] not in SUBCOMMANDS:
                errors.add(cw, f"args {args}: the first must be a molecule subcommand ({', '.join(sorted(SUBCOMMANDS))})")
            if c.get("command"):
                errors.add(cw, "command overrides the image's ENTRYPOINT (the molecule binary): use args")
    if len(images) > 1:
        errors.add("infra/k8s", f"containers run different images: {sorted(images, key=str)}")

    # A worker's shutdown: the grace for running jobs, 5 s for an exec to stop, acks retried
    # through a fault for half a lease (jobs/src/runtime/acker.rs), and a margin. Killed
    # sooner, its pending acks are lost: each job waits for a rescue that counts its attempt.
    def env_secs(c, name, default):
        for e in c.get("env", []):
            if e["name"] == name and "value" in e:
                return int(e["value"])
        for ef in c.get("envFrom", []):
            cm = by.get("ConfigMap", {}).get(ef.get("configMapRef", {}).get("name"))
            if cm and name in (cm[1].get("data") or {}):
                return int(cm[1]["data"][name])
        return default

    for where, d in by.get("Deployment", {}).values():
        spec, _ = pod_spec(d)
        for c in spec["containers"]:
            if (c.get("args") or [None])[0] not in ("worker", "serve"):
                continue
            grace = env_secs(c, "MOLECULE_SHUTDOWN_GRACE_SECS", 30)
            lease = env_secs(c, "MOLECULE_JOB_LEASE_SECS", 30)
            need = grace + 5 + lease // 2 + 5
            have = spec.get("terminationGracePeriodSeconds", 30)
            if have < need:
                errors.add(where, f"terminationGracePeriodSeconds {have}: a shutdown needs {need} "
                                  f"(grace {grace} + interrupt wait 5 + half the lease {lease // 2} + margin 5)")

    # Services: selector and ports reach a Deployment's pods.
    for where, svc in by.get("Service", {}).values():
        sel = svc["spec"].get("selector", {})
        targets = [(w, d) for w, d in by.get("Deployment", {}).values()
                   if all(pod_spec(d)[1].get(k) == v for k, v in sel.items())]
        if not targets:
            errors.add(where, f"Service {svc['metadata']['name']}: its selector matches no Deployment's pods")
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            for w, d in targets:
                c_ports = {x for c in pod_spec(d)[0]["containers"] for port in c.get("ports", [])
                           for x in (port.get("name"), port["containerPort"])}
                if tp not in c_ports:
                    errors.add(where, f"targetPort {tp}: Deployment {d['metadata']['name']} declares no such port")
    for where, pdb in by.get("PodDisruptionBudget", {}).values():
        sel = pdb["spec"].get("selector", {}).get("matchLabels", {})
        if not any(all(pod_spec(d)[1].get(k) == v for k, v in sel.items()) for _, d in by.get("Deployment", {}).values()):
            errors.add(where, "PodDisruptionBudget selects no Deployment's pods")

    # TriggerAuthentications: their Secret keys exist.
    for where, ta in by.get("TriggerAuthentication", {}).values():
        for ref in ta["spec"].get("secretTargetRef", []):
            if not secret_has(ref["name"], ref["key"]):
                errors.add(where, f"secretTargetRef {ref['parameter']}: no key {ref['key']} in Secret {ref['name']}")

    # Worker pools: one Deployment and one ScaledObject each.
    pools = {}
    workers = {}
    for where, d in by.get("Deployment", {}).values():
        labels = d["metadata"].get("labels", {})
        if labels.get(COMPONENT_LABEL) != "worker":
            continue
        name = d["metadata"]["name"]
        spec, tlabels = pod_spec(d)
        pool = tlabels.get(POOL_LABEL)
        args = spec["containers"][0].get("args") or []
        m = re.fullmatch(r"([a-z0-9_]+)=([1-9][0-9]*)", args[2]) if len(args) == 3 and args[:2] == ["worker", "--pool"] else None
        if len(spec["containers"]) != 1 or not m:
            errors.add(where, f"a worker Deployment runs one container with args [worker, --pool, POOL=N], not {args}")
            continue
        if m.group(1) != pool or labels.get(POOL_LABEL) != pool:
            errors.add(where, f"--pool {m.group(1)} but the {POOL_LABEL} labels say {pool!r}/{labels.get(POOL_LABEL)!r}")
            continue
        if "replicas" in d["spec"]:
            errors.add(where, "spec.replicas is set: its ScaledObject owns the replica count (apply would reset it)")
        if pool in workers:
            errors.add(where, f"pool {pool} has a second Deployment ({workers[pool]})")
        workers[pool] = name
        pools[pool] = {"pool": pool, "deployment": name, "concurrency": int(m.group(2))}
    scaled = {}
    for where, so in by.get("ScaledObject", {}).values():
        ref = so["spec"]["scaleTargetRef"]
        target = ref["name"]
        if ref.get("kind", "Deployment") != "Deployment" or target not in by.get("Deployment", {}):
            errors.add(where, f"scaleTargetRef {target}: no such Deployment")
            continue
        pool = next((p for p, n in workers.items() if n == target), None)
        if pool is None:
            errors.add(where, f"scaleTargetRef {target} is not a worker pool's Deployment")
            continue
        if pool in scaled:
            errors.add(where, f"pool {pool} has a second ScaledObject ({scaled[pool]})")
        scaled[pool] = so["metadata"]["name"]
        triggers = so["spec"]["triggers"]
        # `depth`: the jobs the pool's claim would take now; `load`: those plus the ones
        # running (so a saturated pool is not scaled down). Both postgresql, both this pool's.
        named = {t.get("name"): t for t in triggers}
        if sorted(named) != ["depth", "load"] or any(t["type"] != "postgresql" for t in triggers):
            errors.add(where, "two postgresql triggers, named depth and load")
            continue
        for t in triggers:
            q = t["metadata"].get("query", "")
            if not re.search(r"\bjob_type\s*=\s*'" + re.escape(pool) + r"'", q):
                errors.add(where, f"the {t['name']} trigger's query does not select job_type = '{pool}': {q!r}")
        t = named["depth"]
        meta = t["metadata"]
        query = meta.get("query", "")
        load_query = named["load"]["metadata"].get("query", "")
        try:
            target_value = float(meta.get("targetQueryValue", ""))
            if target_value <= 0:
                raise ValueError
        except ValueError:
            errors.add(where, f"targetQueryValue must be a positive number, not {meta.get('targetQueryValue')!r}")
            target_value = None
        auth = t.get("authenticationRef", {})
        if auth.get("kind", "TriggerAuthentication") != "TriggerAuthentication" or \
                auth.get("name") not in by.get("TriggerAuthentication", {}):
            errors.add(where, f"authenticationRef {auth.get('name')}: no such TriggerAuthentication")
        else:
            params = {r["parameter"] for r in by["TriggerAuthentication"][auth["name"]][1]["spec"].get("secretTargetRef", [])}
            if "connection" not in params and not {"host", "password"} <= params:
                errors.add(where, "the TriggerAuthentication gives the scaler no connection")
        mn, mx = so["spec"].get("minReplicaCount", 0), so["spec"].get("maxReplicaCount", 100)
        if mn > mx:
            errors.add(where, f"minReplicaCount {mn} > maxReplicaCount {mx}")
        pools[pool].update({"scaled_object": so["metadata"]["name"], "query": query, "load_query": load_query,
                            "target_query_value": target_value, "min_replicas": mn, "max_replicas": mx})
    for pool, name in workers.items():
        if pool not in scaled:
            errors.add(f"Deployment {name}", f"pool {pool} has no ScaledObject")
    return [pools[p] for p in sorted(pools)], sorted(images, key=str)


# --- compose, Dockerfile -----------------------------------------------------------------

def check_compose(errors):
    f = INFRA / "compose.yaml"
    where = str(f.relative_to(REPO))
    doc = yaml.safe_load(f.read_text())
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    v = jsonschema.Draft7Validator(schema)
    for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        errors.add(where, format_error(e))
    services = doc.get("services", {})
    commands = []
    for name, s in services.items():
        for dep, cond in (s.get("depends_on") or {}).items() if isinstance(s.get("depends_on"), dict) else []:
            if dep not in services:
                errors.add(where, f"{name} depends on {dep}: no such service")
                continue
            c = cond.get("condition")
            if c == "service_healthy" and not services[dep].get("healthcheck"):
                errors.add(where, f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            if c == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                errors.add(where, f"{name} waits for {dep} to complete, but {dep} restarts")
        build = s.get("build")
        if isinstance(build, dict):
            ctx = (f.parent / build.get("context", ".")).resolve()
            if not (ctx / build.get("dockerfile", "Dockerfile")).is_file():
                errors.add(where, f"{name}: build file {build.get('dockerfile')} not found in {ctx}")
        if s.get("image", "").startswith("molecule"):
            cmd = s.get("command")
            if not isinstance(cmd, list) or not cmd or cmd[0] not in SUBCOMMANDS:
                errors.add(where, f"{name}: command {cmd!r} must be a list starting with a molecule subcommand")
            else:
                commands.append((f"{where} service {name}", cmd))
    if "postgres" in services and not services["postgres"].get("healthcheck"):
        errors.add(where, "postgres has no healthcheck")
    return commands


def check_dockerfile(errors):
    f = INFRA / "Dockerfile"
    where = str(f.relative_to(REPO))
    text = f.read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.strip().startswith("#")]
    stages = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
    if len(stages) < 2:
        errors.add(where, "expected a multi-stage build (a builder stage and a runtime stage)")
        return
    final = lines[stages[-1]:]
    users = [l.split(None, 1)[1] for l in final if l.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        errors.add(where, "the runtime stage must end as a non-root USER")
    elif not users[-1].split(":")[0].isdigit():
        errors.add(where, "USER should be numeric (Kubernetes' runAsNonRoot checks the uid)")
    entry = [l for l in final if l.upper().startswith("ENTRYPOINT ")]
    if not entry or "molecule" not in entry[-1] or not entry[-1].split(None, 1)[1].startswith("["):
        errors.add(where, "ENTRYPOINT must run the molecule binary, in exec form")
    if not any("--bin molecule" in l for l in lines[:stages[-1]]):
        errors.add(where, "the builder stage does not build --bin molecule")
    ignore = REPO / ".dockerignore"
    patterns = ignore.read_text().split() if ignore.is_file() else []
    for must in ("target", ".git"):
        if must not in patterns and f"/{must}" not in patterns:
            errors.add(".dockerignore", f"{must} is not excluded from the build context")


def check_commands(binary, commands, errors):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for where, args in commands:
        r = subprocess.run([binary, *args, "--help"], capture_output=True, text=True, env=env, timeout=30)
        if r.returncode != 0:
            errors.add(where, f"`molecule {' '.join(args)}` is refused by {binary}: {(r.stderr or r.stdout).strip()[:400]}")


# --- main ------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the pools and their KEDA queries as JSON")
    ap.add_argument("--molecule", metavar="BIN", help="the molecule binary: every command line must parse")
    ap.add_argument("paths", nargs="*", help="manifests to check instead of infra/k8s/*.yaml "
                                             "(the cross-object checks then see only these)")
    opts = ap.parse_args()

    errors = Errors()
    schema_dir = k8s_schema_dir()
    defs = json.loads((schema_dir / "_definitions.json").read_text())
    defs_resource = Resource.from_contents(defs, default_specification=DRAFT202012)
    crds = load_crds(errors)

    files = [Path(p).resolve() for p in opts.paths] or sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    objs = []
    for f in files:
        rel = str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f)
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as e:
            errors.add(rel, f"not YAML: {e}")
            continue
        for i, d in enumerate(docs):
            if d is None:
                continue
            where = f"{rel}#{i}"
            if not isinstance(d, dict) or not all(k in d for k in ("apiVersion", "kind", "metadata")) \
                    or not isinstance(d["metadata"], dict) or "name" not in d["metadata"]:
                errors.add(where, "not a Kubernetes object (apiVersion, kind, metadata.name)")
                continue
            where = f"{rel} {d['kind']}/{d['metadata']['name']}"
            crd = crds.get((d["apiVersion"], d["kind"]))
            if crd is not None:
                validate_crd(d, crd, defs_resource, where, errors)
            elif d["apiVersion"].split("/")[0].endswith("keda.sh"):
                errors.add(where, f"{d['apiVersion']} {d['kind']}: no vendored KEDA CRD serves it")
            else:
                validate_core(d, schema_dir, defs_resource, where, errors)
            objs.append((where, d))

    n_schema_errors = len(errors.items)
    pools, images = [], []
    if n_schema_errors == 0:
        # Cross-object checks read fields the schemas guarantee.
        pools, images = check_references(objs, errors)
    commands = []
    if not opts.paths:
        commands = check_compose(errors)
        check_dockerfile(errors)
        for where, d in objs:
            spec, _ = pod_spec(d)
            for c in (spec or {}).get("containers", []):
                if c.get("args"):
                    commands.append((f"{where} container {c['name']}", c["args"]))
    if opts.molecule:
        check_commands(opts.molecule, commands, errors)

    if errors.items:
        for e in errors.items:
            print(f"error: {e}", file=sys.stderr)
        print(f"{len(errors.items)} error(s) in the deployment files", file=sys.stderr)
        return 1
    kinds = sorted({d["kind"] for _, d in objs})
    if opts.json:
        json.dump({"kubernetes_version": K8S_VERSION, "objects": len(objs), "kinds": kinds,
                   "images": images, "commands_checked": len(commands) if opts.molecule else 0,
                   "pools": pools}, sys.stdout, indent=2)
        print()
    else:
        print(f"{len(objs)} objects in {len(files)} files valid against Kubernetes {K8S_VERSION} (strict) "
              f"and KEDA's CRDs: {', '.join(kinds)}")
        for p in pools:
            print(f"  pool {p['pool']}: {p['deployment']}, KEDA target {p.get('target_query_value')}")
        if not opts.paths:
            print("infra/compose.yaml valid against the Compose specification; infra/Dockerfile checked")
        if opts.molecule:
            print(f"{len(commands)} command lines parsed by {opts.molecule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
