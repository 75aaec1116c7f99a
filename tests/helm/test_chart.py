"""The Helm chart in helm/vllm-mm-events, checked with the real helm CLI and kubeconform.

helm and kubeconform are built from the Go module proxy on first use and cached
(tests/support/k8s_tools.py); the Kubernetes schemas come from the kubernetes-validate
package, the CRD schemas from the prometheus-operator and KEDA Go modules.

- `helm lint --strict` for the defaults and every ci/*-values.yaml;
- `helm template` for each of them, and kubeconform -strict over everything rendered
  (Kubernetes KUBERNETES_VERSION schemas; no schema may be missing);
- what matters in the output: the --ec-transfer-config parses with the publisher's own
  PublisherConfig and holds the values given; credentials only through secretKeyRef and no
  Secret rendered; probes, security contexts and resources everywhere; one consumer
  Deployment per sink with the right arguments; IRSA, MinIO and SASL_SSL wiring;
- values.schema.json and the chart's own checks reject bad values with a message that names
  the field;
- least privilege: one ServiceAccount per component, each container references exactly the
  Secrets it needs (vLLM no sink Secret, a consumer only its own sink's), optional
  NetworkPolicies, the vLLM API key from a Secret, TLS to the stores by default, install notes
  that warn about plaintext connections, inline librdkafka secrets refused by the schema;
- the Grafana dashboards (dashboards/*.json in ConfigMaps): rendered only when enabled, well-formed,
  every query valid PromQL (Prometheus's parser, tests/helm/promqlcheck) over metrics the code
  exports (consumers.metrics, publisher.sidecar.metrics), and every exported metric on a panel.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from publisher.config import KEYS, PublisherConfig, redact_mapping

import k8s_tools

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "vllm-mm-events"
CI_VALUES = {p.name[: -len("-values.yaml")]: p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
VALUE_SETS = ["default", *CI_VALUES]
RELEASE = "mme"
SINKS = ("qdrant", "pgvector", "milvus", "lancedb")
SINK_SECRET_ENV = {"qdrant": ("apiKey", "QDRANT_API_KEY"), "pgvector": ("password", "PGPASSWORD"),
                   "milvus": ("token", "MILVUS_TOKEN")}
# Env vars that carry credentials: they must come from a Secret.
SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|USER_INFO|USERNAME|API_KEY|^AWS_(ACCESS|SECRET|SESSION)")


# ---- helpers --------------------------------------------------------------------------------

def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(k8s_tools.helm_binary()), *args], capture_output=True, text=True, timeout=120)


def merge_values(base, override):
    """Helm's coalescing: maps merge, anything else replaces, null deletes."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_values(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def values_for(name: str) -> dict:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    if name == "default":
        return defaults
    return merge_values(defaults, yaml.safe_load(CI_VALUES[name].read_text()))


def value_args(name: str) -> list[str]:
    return [] if name == "default" else ["-f", str(CI_VALUES[name])]


class Rendered:
    def __init__(self, name: str, text: str, values: dict | None = None):
        self.name, self.text = name, text
        self.docs = [d for d in yaml.safe_load_all(text) if d]
        self.values = values_for(name) if values is None else values

    def kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> dict:
        found = [d for d in self.kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name}, got {len(found)}"
        return found[0]

    def deployments(self, component: str) -> list[dict]:
        return [d for d in self.kind("Deployment")
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]

    def vllm(self) -> dict:
        (d,) = self.deployments("vllm")
        return d

    def consumer(self, name: str) -> dict:
        return self.one("Deployment", f"{RELEASE}-vllm-mm-events-consumer-{name}")

    def service_account(self, d: dict) -> dict:
        return self.one("ServiceAccount", d["spec"]["template"]["spec"]["serviceAccountName"])


def render_with(tmp_path: Path, base: str, overlay: dict) -> Rendered:
    """`helm template` of a value set plus an overlay (a values file, as `-f` merges it)."""
    f = tmp_path / f"overlay-{len(list(tmp_path.glob('overlay-*')))}.yaml"
    f.write_text(yaml.safe_dump(overlay))
    res = run_helm("template", RELEASE, str(CHART), "--namespace", "mm", *value_args(base), "-f", str(f))
    assert res.returncode == 0, f"helm template ({base} + {overlay}) failed:\n{res.stderr}"
    return Rendered(f"{base}+overlay", res.stdout, merge_values(values_for(base), overlay))


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def argv(c: dict) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def arg_after(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} should appear once in {args}"
    return args[args.index(flag) + 1]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_ref(c: dict, name: str) -> tuple[str, str]:
    e = env_of(c).get(name)
    assert e is not None, f"env {name} missing in container {c['name']}"
    assert "value" not in e, f"env {name} has a literal value"
    ref = e["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def ec_transfer_config(r: Rendered) -> dict:
    return json.loads(arg_after(argv(container(r.vllm())), "--ec-transfer-config"))


def pod_volumes(d: dict) -> dict[str, dict]:
    return {v["name"]: v for v in d["spec"]["template"]["spec"].get("volumes", [])}


def mounts(c: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


# ---- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    out = {}
    for name in VALUE_SETS:
        res = run_helm("template", RELEASE, str(CHART), "--namespace", "mm", *value_args(name))
        assert res.returncode == 0, f"helm template ({name}) failed:\n{res.stderr}"
        out[name] = Rendered(name, res.stdout)
    return out


# ---- lint and schema validation of the output ----------------------------------------------

def test_ci_value_sets_cover_the_issue():
    assert {"minio-static", "aws-irsa", "kafka-sasl-ssl", "least-privilege", "publisher-spool-pvc",
            *(f"sink-{s}" for s in SINKS)} <= set(CI_VALUES)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name):
    res = run_helm("lint", "--strict", str(CHART), *value_args(name))
    assert res.returncode == 0 and "0 chart(s) failed" in res.stdout, res.stdout + res.stderr
    assert "[WARNING]" not in res.stdout and "[ERROR]" not in res.stdout, res.stdout


def test_kubeconform_strict_on_everything_rendered(rendered, tmp_path):
    files = []
    for name, r in rendered.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(r.text)
        files.append(f)
    res = subprocess.run(k8s_tools.kubeconform_command(*files), capture_output=True, text=True, timeout=300)
    report = json.loads(res.stdout)
    problems = [f"{x['filename']}: {x['kind']} {x['name']}: {x['status']} {x.get('msg', '')}"
                for x in report["resources"]]
    summary = report["summary"]
    assert res.returncode == 0 and summary["invalid"] == 0 and summary["errors"] == 0, "\n".join(problems)
    assert summary["skipped"] == 0, "\n".join(problems)
    total = sum(len(r.docs) for r in rendered.values())
    assert summary["valid"] == total, summary
    kinds = {d["kind"] for r in rendered.values() for d in r.docs}
    # Every kind the chart can render was rendered by some value set, so all were validated.
    assert kinds == {"ServiceAccount", "Service", "Deployment", "PodDisruptionBudget", "ConfigMap", "Ingress",
                     "ServiceMonitor", "ScaledObject", "TriggerAuthentication", "NetworkPolicy",
                     "PersistentVolumeClaim"}


def test_kubeconform_rejects_an_invalid_manifest(tmp_path):
    """The validation is real: a typo in a Deployment and in a ScaledObject are caught offline."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
         "spec": {"replicas": "two", "selector": {"matchLabels": {"a": "b"}},
                  "template": {"metadata": {"labels": {"a": "b"}},
                               "spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicy": "Sometimes",
                                                        "resourcez": {}}]}}}},
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
         "spec": {"scaleTargetRef": {"name": "x"}, "maxReplicaCount": "many", "triggers": []}},
    ]))
    res = subprocess.run(k8s_tools.kubeconform_command(bad), capture_output=True, text=True, timeout=120)
    report = json.loads(res.stdout)
    assert res.returncode != 0 and report["summary"]["invalid"] == 2, res.stdout


# ---- the publisher's configuration -----------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in VALUE_SETS if values_for(n)["vllm"]["enabled"]])
def test_ec_transfer_config_parses_with_the_publisher_config(rendered, name):
    r = rendered[name]
    v = r.values
    cfg = ec_transfer_config(r)
    assert cfg["ec_connector"] == "MMEmbeddingPublisher" and cfg["ec_role"] == "ec_both"
    extra = cfg["ec_connector_extra_config"]
    assert set(extra) <= set(KEYS)
    parsed = PublisherConfig.from_dict(extra)

    o, k, p = v["objectStore"], v["kafka"], v["publisher"]
    assert parsed.object_store == (f"s3://{o['bucket']}/{o['prefix']}" if o["prefix"] else f"s3://{o['bucket']}")
    assert parsed.event_sink == f"kafka://{','.join(k['bootstrapServers'])}/{k['topic']}"
    assert extra.get("s3_endpoint_url") == (o["endpointUrl"] or None)
    assert extra.get("s3_region") == (o["region"] or None)
    assert parsed.kafka["security.protocol"] == k["securityProtocol"]
    for key, value in k["config"].items():
        assert parsed.kafka[key] == value
    if k["securityProtocol"].startswith("SASL_"):
        assert parsed.kafka["sasl.mechanism"] == k["sasl"]["mechanism"]
    assert extra.get("schema_registry_url") == (k["schemaRegistry"]["url"] or None)
    assert parsed.storage_dtype == p["storageDtype"]
    assert parsed.backpressure == p["backpressure"]
    assert parsed.max_inflight_bytes == p["maxInflightBytes"]
    assert parsed.max_pending_events == p["maxPendingEvents"]
    assert parsed.upload_threads == p["uploadThreads"]
    assert parsed.durability_timeout_s == p["durabilityTimeoutS"]
    assert parsed.shutdown_timeout_s == p["shutdownTimeoutS"]
    assert parsed.publish_text_only == p["publishTextOnly"]
    assert parsed.allow_client_embeddings == p["allowClientEmbeddings"]
    assert parsed.fsync == p["fsync"]
    assert parsed.topic_partitions == p["topicPartitions"]
    # The outbox on its volume (or none), the metrics port (0: off).
    assert parsed.spool_dir == (p["spool"]["mountPath"].rstrip("/") if p["spool"]["enabled"] else None)
    assert extra["spool_dir"] == (parsed.spool_dir or "")
    assert parsed.max_spool_bytes == p["spool"]["maxBytes"]
    assert parsed.metrics_port == extra["metrics_port"] == p["metricsPort"]
    # Nothing the publisher itself would mask as a secret is in the JSON (anyone who can read
    # the Deployment sees it).
    assert redact_mapping(parsed.kafka) == parsed.kafka
    assert redact_mapping(parsed.schema_registry) == parsed.schema_registry


@pytest.mark.parametrize("name", [n for n in VALUE_SETS if values_for(n)["vllm"]["enabled"]])
def test_vllm_command_line(rendered, name):
    r, v = rendered[name], rendered[name].values["vllm"]
    c = container(r.vllm())
    args = argv(c)
    assert args[:3] == ["vllm", "serve", v["model"]]
    assert arg_after(args, "--served-model-name") == (v["servedModelName"] or v["model"])
    assert arg_after(args, "--tensor-parallel-size") == str(v["tensorParallelSize"])
    assert arg_after(args, "--port") == str(v["port"])
    # vLLM flushes both connector halves inside --shutdown-timeout: the drain plus their flush budget.
    shutdown = int(arg_after(args, "--shutdown-timeout"))
    flush_s = math.ceil(r.values["publisher"]["shutdownTimeoutS"])
    assert shutdown == v["shutdownTimeoutSeconds"] + 2 * (flush_s + 5)
    assert env_of(c)["VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS"]["value"] == str(flush_s + 10)
    for extra in v["extraArgs"]:
        assert extra in args
    # The API guard against caller-chosen media ids is installed, refusing them unless allowed.
    guard = "NamespaceClientMediaIds" if r.values["publisher"]["allowClientMediaIds"] else "RefuseClientMediaIds"
    assert arg_after(args, "--middleware") == f"publisher.vllm.api_guard.{guard}"
    import importlib

    assert callable(getattr(importlib.import_module("publisher.vllm.api_guard"), guard))
    grace = r.vllm()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > shutdown
    # GPUs: tensorParallelSize by default, in requests and limits alike.
    gpus = v["gpu"]["count"] or v["tensorParallelSize"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus == c["resources"]["requests"]["nvidia.com/gpu"]
    # /dev/shm in memory, sized; writable HOME/caches so the root filesystem can be read-only.
    dshm = pod_volumes(r.vllm())[mounts(c)["/dev/shm"]["name"]]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": v["shm"]["sizeLimit"]}
    env = env_of(c)
    for var in ("HOME", "HF_HOME", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME"):
        path = env[var]["value"]
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts(c)), f"{var}={path} not on a mount"
    cache = pod_volumes(r.vllm())["model-cache"]
    if v["modelCache"]["existingClaim"]:
        assert cache["persistentVolumeClaim"]["claimName"] == v["modelCache"]["existingClaim"]
    else:
        assert cache["emptyDir"]["sizeLimit"] == v["modelCache"]["sizeLimit"]


# ---- secrets -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_are_referenced_never_inlined(rendered, name):
    r = rendered[name]
    assert not r.kind("Secret"), "the chart must not render Secrets"
    for d in r.kind("Deployment"):
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for e in c.get("env", []):
                if SECRET_ENV.search(e["name"]):
                    assert "value" not in e and set(e["valueFrom"]) == {"secretKeyRef"}, e
            for src in c.get("envFrom", []):
                assert "secretRef" not in src
    # The non-secret client settings the consumers get hold no secret either.
    for cm in r.kind("ConfigMap"):
        for key, value in cm["data"].items():
            assert not SECRET_ENV.search(key), key
            if value.startswith("{"):
                settings = json.loads(value)
                assert not [k for k in settings if re.search(r"password|secret|user\.info|username", k)], settings
    # No credential-looking userinfo in any URI anywhere.
    assert not re.search(r"://[^/\s\"]*:[^/\s\"]*@", r.text)


# ---- probes, security, resources ----------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_security_and_resources(rendered, name):
    r = rendered[name]
    assert r.kind("Deployment")
    for d in r.kind("Deployment"):
        spec = d["spec"]["template"]["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and isinstance(psc["runAsUser"], int) and psc["runAsUser"] > 0
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "/tmp" in mounts(c), "a read-only root filesystem needs a writable /tmp"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (d["metadata"]["name"], c["resources"])
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        c = spec["containers"][0]
        if component == "vllm":
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        else:
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
            assert spec["terminationGracePeriodSeconds"] == 30
            assert "checksum/config" in d["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_services_and_disruption_budgets_select_pods(rendered, name):
    r = rendered[name]
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in r.kind("Deployment")]
    for obj in [*r.kind("Service"), *r.kind("PodDisruptionBudget")]:
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        matched = [lbl for lbl in pod_labels if selector.items() <= lbl.items()]
        assert len(matched) == 1, f"{obj['kind']} {obj['metadata']['name']} selects {len(matched)} Deployments"
    for d in r.kind("Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()


# ---- consumers -----------------------------------------------------------------------------

@pytest.mark.parametrize("sink", SINKS)
def test_one_consumer_deployment_per_sink(rendered, sink):
    r = rendered[f"sink-{sink}"]
    (entry,) = r.values["consumers"]
    shared = r.values["consumer"]
    (d,) = r.deployments("consumer")
    assert d is r.consumer(entry["name"])
    assert d["spec"]["replicas"] == entry.get("replicas", shared["replicas"])
    c = container(d)
    args = argv(c)
    assert args[:2] == ["vllm-mm-events", "consume"]
    k = r.values["kafka"]
    assert arg_after(args, "--source") == f"kafka://{','.join(k['bootstrapServers'])}/{k['topic']}"
    assert arg_after(args, "--group") == (entry.get("group") or f"{RELEASE}-vllm-mm-events-{entry['name']}")
    assert arg_after(args, "--sink") == entry["sink"]["uri"]
    assert arg_after(args, "--pooling") == entry.get("pooling", shared["pooling"])
    assert ("--normalize" in args) == entry.get("normalize", shared["normalize"])
    assert arg_after(args, "--metrics-port") == str(shared["metricsPort"])
    assert arg_after(args, "--distance") == entry.get("distance", shared["distance"])
    assert arg_after(args, "--log-format") == shared["logFormat"]
    dlq = merge_values(shared["dlq"], entry.get("dlq"))
    if dlq["enabled"]:
        assert arg_after(args, "--dlq") == f"kafka://{','.join(k['bootstrapServers'])}/" + (
            dlq["topic"] or f"{k['topic']}.dlq")
    else:
        assert arg_after(args, "--dlq") == "none"
    assert c["ports"] == [{"name": "metrics", "containerPort": shared["metricsPort"], "protocol": "TCP"}]
    assert c["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-vllm-mm-events-consumer"}}]
    if sink in SINK_SECRET_ENV:
        field, env_name = SINK_SECRET_ENV[sink]
        ref = entry["sink"][field]
        assert secret_ref(c, env_name) == (ref["secretName"], ref["secretKey"])
    else:  # lancedb: the table lives on the mounted volume
        storage = entry["sink"]["storage"]
        mount = mounts(c)[storage["mountPath"]]
        assert entry["sink"]["uri"].startswith(f"lancedb://{storage['mountPath']}/")
        assert pod_volumes(d)[mount["name"]]["persistentVolumeClaim"]["claimName"] == storage["existingClaim"]
    for e in entry.get("extraEnv", []):
        assert env_of(c)[e["name"]] == e
    if "resources" in entry:
        assert c["resources"] == entry["resources"]
    # The metrics Service and the consumers' ConfigMap.
    svc = r.one("Service", d["metadata"]["name"])
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    cm = r.one("ConfigMap", f"{RELEASE}-vllm-mm-events-consumer")
    assert json.loads(cm["data"]["VLLM_MM_EVENTS_KAFKA"]) == {"security.protocol": k["securityProtocol"]}


def pod_environ(r: Rendered, d: dict) -> dict[str, str]:
    """The environment a container would see: its ConfigMap, literal env, and a stand-in
    value ("<Secret name/key>") for each secretKeyRef."""
    c = container(d)
    environ = {}
    for src in c.get("envFrom", []):
        environ.update(r.one("ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        environ[e["name"]] = f"<{ref['name']}/{ref['key']}>" if ref else e["value"]
    return environ


@pytest.mark.parametrize("name", [n for n in VALUE_SETS if values_for(n)["consumers"]])
def test_consumer_command_line_parses_with_the_consumer_config(rendered, name):
    """Each consumer's args and env go through the consumer's own parser and ConsumerConfig."""
    from consumers.cli import build_parser
    from consumers.config import KEYS as CONSUMER_KEYS
    from consumers.config import ConsumerConfig

    r = rendered[name]
    for d in r.deployments("consumer"):
        args = argv(container(d))
        assert args[0] == "vllm-mm-events"
        ns = build_parser().parse_args(args[1:])
        assert ns.command == "consume"
        flags = {k: v for k, v in vars(ns).items() if k in CONSUMER_KEYS}
        cfg = ConsumerConfig.load(flags, environ=pod_environ(r, d))
        assert cfg.sinks == (arg_after(args, "--sink"),) and cfg.group == arg_after(args, "--group")
        assert cfg.metrics_port == r.values["consumer"]["metricsPort"]
        assert cfg.s3_endpoint_url == (r.values["objectStore"]["endpointUrl"] or None)
        # The consumer reads objects only from the store the publisher writes to.
        o = r.values["objectStore"]
        assert cfg.object_store == (f"s3://{o['bucket']}/{o['prefix']}" if o.get("prefix") else f"s3://{o['bucket']}",)
        if r.deployments("vllm"):
            assert cfg.object_store == (ec_transfer_config(r)["ec_connector_extra_config"]["object_store"],)
        k = r.values["kafka"]
        assert cfg.kafka["security.protocol"] == k["securityProtocol"]
        if k["securityProtocol"].startswith("SASL_"):
            secret = k["sasl"].get("consumerExistingSecret") or k["sasl"]["existingSecret"]  # the consumers' own user
            assert cfg.kafka["sasl.username"] == f"<{secret}/{k['sasl']['usernameKey']}>"
            assert cfg.kafka["sasl.password"] == f"<{secret}/{k['sasl']['passwordKey']}>"
        if k["schemaRegistry"]["url"]:
            assert cfg.schema_registry_url == k["schemaRegistry"]["url"]
        # The consumer finishes its batch within its shutdown timeout, inside the grace period.
        assert cfg.shutdown_timeout_s < d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_publisher_merges_secret_env_into_the_generated_config(rendered):
    """vLLM's --ec-transfer-config plus its env (Secrets) is what the publisher loads."""
    r = rendered["kafka-sasl-ssl"]
    extra = ec_transfer_config(r)["ec_connector_extra_config"]
    cfg = PublisherConfig.load(extra, environ=pod_environ(r, r.vllm()))
    assert cfg.kafka["sasl.username"] == "<kafka-user-vllm/username>"
    assert cfg.kafka["sasl.password"] == "<kafka-user-vllm/password>"
    assert cfg.kafka["ssl.key.password"] == "<kafka-client-tls-pass/password>"
    assert cfg.kafka["ssl.ca.location"] == "/etc/vllm-mm-events/kafka/ca/ca.crt"
    assert cfg.schema_registry["basic.auth.user.info"] == "<schema-registry-auth/user-info>"


def test_consumers_only_release_has_no_vllm(rendered):
    r = rendered["sink-milvus"]
    assert not r.deployments("vllm")
    assert not [o for o in r.docs if o["metadata"]["labels"].get("app.kubernetes.io/component") == "vllm"]


# ---- the deployment scenarios ----------------------------------------------------------------

def test_minio_with_static_credentials(rendered):
    r = rendered["minio-static"]
    creds = r.values["objectStore"]["credentials"]
    for d in r.kind("Deployment"):
        c = container(d)
        assert secret_ref(c, "AWS_ACCESS_KEY_ID") == ("minio-credentials", creds["accessKeyIdKey"])
        assert secret_ref(c, "AWS_SECRET_ACCESS_KEY") == ("minio-credentials", creds["secretAccessKeyKey"])
        assert "AWS_SESSION_TOKEN" not in env_of(c)
    extra = ec_transfer_config(r)["ec_connector_extra_config"]
    assert extra["s3_endpoint_url"] == "http://minio.minio.svc.cluster.local:9000"
    assert extra["object_store"] == "s3://mm-embeddings/prod/vllm"
    cm = r.one("ConfigMap", f"{RELEASE}-vllm-mm-events-consumer")["data"]
    assert cm["VLLM_MM_EVENTS_S3_ENDPOINT_URL"] == "http://minio.minio.svc.cluster.local:9000"
    assert cm["VLLM_MM_EVENTS_S3_REGION"] == "us-east-1"
    for sa in r.kind("ServiceAccount"):
        assert "eks.amazonaws.com/role-arn" not in (sa["metadata"].get("annotations") or {})


def test_aws_s3_with_irsa(rendered):
    """vLLM's ServiceAccount carries irsaRoleArn (a role that may write the bucket), the
    consumers' their own read-only role (serviceAccount.consumer.annotations wins)."""
    r = rendered["aws-irsa"]
    role = {d["metadata"]["labels"]["app.kubernetes.io/component"]:
            r.service_account(d)["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] for d in r.kind("Deployment")}
    assert role == {"vllm": "arn:aws:iam::123456789012:role/vllm-mm-events",
                    "consumer": "arn:aws:iam::123456789012:role/vllm-mm-events-reader"}
    for d in r.kind("Deployment"):
        spec = d["spec"]["template"]["spec"]
        assert not [n for n in env_of(spec["containers"][0]) if n.startswith("AWS_")], "IRSA needs no keys"
    extra = ec_transfer_config(r)["ec_connector_extra_config"]
    assert "s3_endpoint_url" not in extra and extra["s3_region"] == "eu-west-1"
    v = r.vllm()["spec"]["template"]["spec"]
    assert v["tolerations"][0]["key"] == "nvidia.com/gpu" and v["priorityClassName"] == "high-priority"
    assert v["nodeSelector"] == {"node.kubernetes.io/instance-type": "g6e.12xlarge"}
    assert container(r.vllm())["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_kafka_sasl_ssl_with_schema_registry(rendered):
    r = rendered["kafka-sasl-ssl"]
    deployments = r.kind("Deployment")
    assert len(deployments) == 3
    for d in deployments:
        c = container(d)
        assert secret_ref(c, "VLLM_MM_EVENTS_KAFKA__SASL_USERNAME") == ("kafka-user-vllm", "username")
        assert secret_ref(c, "VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD") == ("kafka-user-vllm", "password")
        assert secret_ref(c, "VLLM_MM_EVENTS_KAFKA__SSL_KEY_PASSWORD") == ("kafka-client-tls-pass", "password")
        assert secret_ref(c, "VLLM_MM_EVENTS_SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO") == (
            "schema-registry-auth", "user-info")
        assert secret_ref(c, "AWS_SESSION_TOKEN") == ("s3-credentials", "AWS_SESSION_TOKEN")
        vols, mnt = pod_volumes(d), mounts(c)
        ca = mnt["/etc/vllm-mm-events/kafka/ca"]
        assert ca["readOnly"] and vols[ca["name"]]["secret"]["secretName"] == "kafka-cluster-ca"
        assert vols[ca["name"]]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
        client = vols[mnt["/etc/vllm-mm-events/kafka/client"]["name"]]["secret"]
        assert client["secretName"] == "kafka-client-tls"
        reg = vols[mnt["/etc/vllm-mm-events/schema-registry/ca"]["name"]]["secret"]
        assert reg["secretName"] == "schema-registry-ca"
    settings = {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "ssl.ca.location": "/etc/vllm-mm-events/kafka/ca/ca.crt",
        "ssl.certificate.location": "/etc/vllm-mm-events/kafka/client/tls.crt",
        "ssl.key.location": "/etc/vllm-mm-events/kafka/client/tls.key",
        "compression.type": "zstd", "client.dns.lookup": "use_all_dns_ips"}
    parsed = PublisherConfig.from_dict(ec_transfer_config(r)["ec_connector_extra_config"])
    assert parsed.kafka == settings
    assert parsed.schema_registry_url == "https://schema-registry.kafka.svc:8081"
    assert parsed.schema_registry == {"ssl.ca.location": "/etc/vllm-mm-events/schema-registry/ca/ca.crt"}
    assert parsed.backpressure == "drop" and parsed.topic_partitions == 12
    cm = r.one("ConfigMap", f"{RELEASE}-vllm-mm-events-consumer")["data"]
    assert json.loads(cm["VLLM_MM_EVENTS_KAFKA"]) == settings
    assert cm["VLLM_MM_EVENTS_SCHEMA_REGISTRY_URL"] == "https://schema-registry.kafka.svc:8081"
    assert json.loads(cm["VLLM_MM_EVENTS_SCHEMA_REGISTRY"]) == parsed.schema_registry
    assert r.vllm()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert secret_ref(container(r.vllm()), "HF_TOKEN") == ("hf-token", "token")

    # KEDA: the qdrant consumer scales on lag (no replicas field), milvus has fixed replicas.
    qdrant, milvus = r.consumer("qdrant"), r.consumer("milvus")
    assert "replicas" not in qdrant["spec"] and milvus["spec"]["replicas"] == 3
    assert arg_after(argv(container(milvus)), "--group") == "milvus-indexer"
    assert arg_after(argv(container(milvus)), "--pooling") == "first"
    (so,) = r.kind("ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == qdrant["metadata"]["name"]
    assert so["spec"]["maxReplicaCount"] == 12
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"] == {
        "bootstrapServers": "kafka-0.kafka:9093,kafka-1.kafka:9093,kafka-2.kafka:9093",
        "consumerGroup": arg_after(argv(container(qdrant)), "--group"), "topic": "prod.vllm.mm-embeddings",
        "lagThreshold": "200", "activationLagThreshold": "0", "offsetResetPolicy": "earliest",
        "allowIdleConsumers": "false", "sasl": "scram_sha512", "tls": "enable"}
    (auth,) = r.kind("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {t["parameter"]: (t["name"], t["key"]) for t in auth["spec"]["secretTargetRef"]}
    assert refs == {"username": ("kafka-user-vllm", "username"), "password": ("kafka-user-vllm", "password"),
                    "ca": ("kafka-cluster-ca", "ca.crt"), "cert": ("kafka-client-tls", "tls.crt"),
                    "key": ("kafka-client-tls", "tls.key"), "keyPassword": ("kafka-client-tls-pass", "password")}

    # ServiceMonitors for vLLM and the consumers, an Ingress, the PDB with minAvailable.
    monitors = {m["metadata"]["name"]: m for m in r.kind("ServiceMonitor")}
    assert set(monitors) == {f"{RELEASE}-vllm-mm-events-vllm", f"{RELEASE}-vllm-mm-events-consumers"}
    for m in monitors.values():
        assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selected = [s for s in r.kind("Service")
                    if m["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        # vLLM: its own metrics on the API port and the publisher's; a consumer: its metrics port.
        endpoints = m["spec"]["endpoints"]
        assert [ep["port"] for ep in endpoints] in (["http", "pub-metrics"], ["metrics"])
        for ep in endpoints:
            assert ep["path"] == "/metrics"
            assert [s for s in selected if ep["port"] in [p["name"] for p in s["spec"]["ports"]]], ep
    (ing,) = r.kind("Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": r.vllm()["metadata"]["name"], "port": {"number": 8000}}
    pdb = r.one("PodDisruptionBudget", r.vllm()["metadata"]["name"])
    assert pdb["spec"] == {"minAvailable": 1, "selector": pdb["spec"]["selector"]}


def test_readme_examples_are_the_tested_values():
    """The minimal values.yaml shown in the chart README (and the top-level README section) is
    ci/minimal-values.yaml, which every test above renders and validates."""
    minimal = (CHART / "ci" / "minimal-values.yaml").read_text()
    assert minimal in (CHART / "README.md").read_text()
    body = "".join(line for line in minimal.splitlines(keepends=True) if not line.startswith("#"))
    for doc in (REPO / "README.md", REPO / "helm" / "DEPLOY-SECTION.md"):
        if doc.exists() and "## Deploy on Kubernetes" in doc.read_text():
            assert body in doc.read_text(), f"{doc.name}: its Deploy on Kubernetes values differ from the tested ones"


# ---- the publisher's outbox and metrics -------------------------------------------------------

QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
QUANTITY_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                  "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
MiB = 1 << 20
VLLM_SETS = [n for n in VALUE_SETS if values_for(n)["vllm"]["enabled"]]


def quantity_bytes(q) -> int:
    """A Kubernetes quantity (1280Mi, 1.5Gi, 2G, a number) in bytes."""
    if isinstance(q, (int, float)):
        return int(q)
    m = QUANTITY.match(q)
    assert m, f"not a quantity: {q!r}"
    return int(float(m[1]) * QUANTITY_UNITS[m[2]])


def publisher_extra(r: Rendered) -> dict:
    return ec_transfer_config(r)["ec_connector_extra_config"]


def spool_volume(r: Rendered) -> tuple[dict, dict]:
    """The spool's volumeMount and volume in the vLLM pod."""
    d = r.vllm()
    (mount,) = [m for m in container(d).get("volumeMounts", []) if m["name"] == "spool"]
    return mount, pod_volumes(d)["spool"]


def pvc(r: Rendered) -> dict:
    return r.one("PersistentVolumeClaim", f"{RELEASE}-vllm-mm-events-vllm-spool")


def kubeconform_ok(tmp_path: Path, *renders: Rendered) -> None:
    files = []
    for i, r in enumerate(renders):
        files.append(tmp_path / f"kubeconform-{i}.yaml")
        files[-1].write_text(r.text)
    res = subprocess.run(k8s_tools.kubeconform_command(*files), capture_output=True, text=True, timeout=300)
    summary = json.loads(res.stdout)["summary"]
    assert res.returncode == 0 and summary["invalid"] == summary["errors"] == summary["skipped"] == 0, res.stdout
    assert summary["valid"] == sum(len(r.docs) for r in renders), summary


@pytest.mark.parametrize("name", VLLM_SETS)
def test_publisher_spool_is_on_its_volume(rendered, name):
    """The outbox directory the publisher is told is the spool volume's mount (the root
    filesystem is read-only), and the volume is larger than max_spool_bytes."""
    r = rendered[name]
    s = r.values["publisher"]["spool"]
    extra = publisher_extra(r)
    mount, volume = spool_volume(r)
    assert extra["spool_dir"] == mount["mountPath"] == s["mountPath"].rstrip("/")
    assert "subPath" not in mount and not mount.get("readOnly")
    assert extra["max_spool_bytes"] == s["maxBytes"]
    assert container(r.vllm())["securityContext"]["readOnlyRootFilesystem"] is True
    if s["volume"] == "emptyDir":
        assert set(volume) == {"name", "emptyDir"}
        assert quantity_bytes(volume["emptyDir"]["sizeLimit"]) >= s["maxBytes"] + 16 * MiB
        assert not r.kind("PersistentVolumeClaim")
    else:
        claim = s["persistentVolumeClaim"]
        assert set(volume) == {"name", "persistentVolumeClaim"}
        assert volume["persistentVolumeClaim"]["claimName"] == (claim["existingClaim"] or pvc(r)["metadata"]["name"])


def test_spool_defaults(rendered, tmp_path):
    """Defaults: an emptyDir of maxBytes + 25% (1 GiB: 1280Mi) at /var/lib/vllm-mm-events/spool."""
    r = rendered["default"]
    extra = publisher_extra(r)
    assert extra["spool_dir"] == "/var/lib/vllm-mm-events/spool" and extra["max_spool_bytes"] == 1 << 30
    _, volume = spool_volume(r)
    assert volume["emptyDir"] == {"sizeLimit": "1280Mi"}
    # Small caps get at least 64Mi of headroom; a sizeLimit given is used as is (in any unit).
    r = render_with(tmp_path, "default", {"publisher": {"spool": {"maxBytes": 8 * MiB}}})
    assert spool_volume(r)[1]["emptyDir"] == {"sizeLimit": "72Mi"}
    for size in ("2Gi", "1.1Gi", "2G", "1090519040", 1090519040):
        r = render_with(tmp_path, "default", {"publisher": {"spool": {"emptyDir": {"sizeLimit": size}}}})
        assert str(spool_volume(r)[1]["emptyDir"]["sizeLimit"]) == str(size)
    # A custom path is mounted and passed as is (less a trailing slash).
    r = render_with(tmp_path, "minimal", {"publisher": {"spool": {"mountPath": "/data/outbox/"}}})
    assert publisher_extra(r)["spool_dir"] == spool_volume(r)[0]["mountPath"] == "/data/outbox"
    assert PublisherConfig.from_dict(publisher_extra(r)).spool_dir == "/data/outbox"


def test_spool_disabled_passes_an_empty_spool_dir(tmp_path):
    """spool.enabled=false: spool_dir "" (the publisher runs without an outbox), no volume and no
    claim, whatever the volume settings say."""
    for overlay in ({"publisher": {"spool": {"enabled": False}}},
                    {"publisher": {"spool": {"enabled": False, "volume": "persistentVolumeClaim"}}}):
        r = render_with(tmp_path, "minimal", overlay)
        extra = publisher_extra(r)
        assert extra["spool_dir"] == ""
        assert PublisherConfig.from_dict(extra).spool_dir is None
        assert "spool" not in pod_volumes(r.vllm())
        assert not [m for m in container(r.vllm())["volumeMounts"] if m["name"] == "spool"]
        assert not r.kind("PersistentVolumeClaim")


def test_spool_on_persistent_volume_claims(rendered, tmp_path):
    """A claim the chart creates (ReadWriteOnce for one replica, ReadWriteMany shared by several,
    sized per engine) or an existing one; all pass kubeconform."""
    # ReadWriteOnce, one replica, the default storage class, derived size.
    rwo = render_with(tmp_path, "minimal", {"publisher": {"spool": {
        "volume": "persistentVolumeClaim", "persistentVolumeClaim": {"annotations": {"backup/enabled": "true"}}}}})
    claim = pvc(rwo)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in claim["spec"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1280Mi"
    assert claim["metadata"]["annotations"] == {"backup/enabled": "true"}
    assert claim["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"
    assert spool_volume(rwo)[1]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    # ReadWriteMany shared by 3 replicas: 3 slots' worth by default.
    rwx = render_with(tmp_path, "minimal", {"vllm": {"replicaCount": 3}, "publisher": {"spool": {
        "volume": "persistentVolumeClaim", "maxBytes": 512 * MiB,
        "persistentVolumeClaim": {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs"}}}})
    claim = pvc(rwx)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs"
    assert claim["spec"]["resources"]["requests"]["storage"] == f"{3 * (512 + 128)}Mi"
    assert publisher_extra(rwx)["max_spool_bytes"] == 512 * MiB
    # The ci value set: a size given, a path of its own.
    ci = rendered["publisher-spool-pvc"]
    assert pvc(ci)["spec"]["resources"]["requests"]["storage"] == "6Gi"
    assert publisher_extra(ci)["spool_dir"] == "/var/lib/vllm-mm-events/outbox"
    # An existing claim: no claim rendered, any replica count (its access mode is the user's).
    existing = render_with(tmp_path, "minimal", {"vllm": {"replicaCount": 2}, "publisher": {"spool": {
        "volume": "persistentVolumeClaim", "persistentVolumeClaim": {"existingClaim": "mm-spool"}}}})
    assert not existing.kind("PersistentVolumeClaim")
    assert spool_volume(existing)[1]["persistentVolumeClaim"] == {"claimName": "mm-spool"}
    kubeconform_ok(tmp_path, rwo, rwx, existing)


def vllm_monitor(r: Rendered) -> dict:
    return r.one("ServiceMonitor", f"{RELEASE}-vllm-mm-events-vllm")


@pytest.mark.parametrize("name", VLLM_SETS)
def test_publisher_metrics_port(rendered, name):
    """publisher.metricsPort: the metrics_port key, a container port, a ClusterIP Service of its
    own, the vLLM ServiceMonitor's second endpoint and a NetworkPolicy rule."""
    r = rendered[name]
    port = r.values["publisher"]["metricsPort"]
    assert port > 0
    assert publisher_extra(r)["metrics_port"] == port
    ports = {p["name"]: p for p in container(r.vllm())["ports"]}
    assert ports["pub-metrics"] == {"name": "pub-metrics", "containerPort": port, "protocol": "TCP"}
    svc = r.one("Service", f"{RELEASE}-vllm-mm-events-vllm-metrics")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "pub-metrics", "port": port, "targetPort": "pub-metrics",
                                     "protocol": "TCP"}]
    assert svc["spec"]["selector"].items() <= r.vllm()["spec"]["template"]["metadata"]["labels"].items()
    # The API Service (maybe a LoadBalancer) does not carry it.
    api = r.one("Service", r.vllm()["metadata"]["name"])
    assert [p["name"] for p in api["spec"]["ports"]] == ["http"]
    if r.values["metrics"]["serviceMonitor"]["enabled"]:
        m = vllm_monitor(r)
        assert [(ep["port"], ep["path"]) for ep in m["spec"]["endpoints"]] == [
            ("http", "/metrics"), ("pub-metrics", "/metrics")]
        assert m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    if r.values["networkPolicy"]["enabled"]:
        np = r.values["networkPolicy"]["vllm"]
        rule = network_policies(r)[r.vllm()["metadata"]["name"]]["spec"]["ingress"][1]
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert rule.get("from", []) == (np["metricsFrom"] or np["ingressFrom"])


def test_publisher_metrics_defaults_and_custom_port(rendered):
    assert publisher_extra(rendered["default"])["metrics_port"] == 9401
    r = rendered["publisher-spool-pvc"]
    assert PublisherConfig.from_dict(publisher_extra(r)).metrics_port == 9500
    assert [ep["port"] for ep in vllm_monitor(r)["spec"]["endpoints"]] == ["http", "pub-metrics"]


def test_publisher_metrics_port_zero_removes_everything(tmp_path):
    r = render_with(tmp_path, "least-privilege", {"publisher": {"metricsPort": 0},
                                                  "metrics": {"serviceMonitor": {"enabled": True}}})
    extra = publisher_extra(r)
    assert extra["metrics_port"] == 0 and PublisherConfig.from_dict(extra).metrics_port == 0
    assert [p["name"] for p in container(r.vllm())["ports"]] == ["http"]
    assert not [s for s in r.kind("Service") if s["metadata"]["name"].endswith("-vllm-metrics")]
    assert "pub-metrics" not in r.text
    assert [ep["port"] for ep in vllm_monitor(r)["spec"]["endpoints"]] == ["http"]
    (rule,) = network_policies(r)[r.vllm()["metadata"]["name"]]["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    kubeconform_ok(tmp_path, r)


def test_publisher_metrics_scrapers_default_to_the_api_peers(tmp_path):
    """networkPolicy.vllm.metricsFrom [] : the ingressFrom peers; both []: any source, that port only."""
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    r = render_with(tmp_path, "minimal", {"networkPolicy": {"enabled": True, "vllm": {"ingressFrom": peers}}})
    api, metrics = network_policies(r)[r.vllm()["metadata"]["name"]]["spec"]["ingress"]
    assert api["from"] == metrics["from"] == peers
    assert metrics["ports"] == [{"port": 9401, "protocol": "TCP"}]
    r = render_with(tmp_path, "minimal", {"networkPolicy": {"enabled": True}})
    api, metrics = network_policies(r)[r.vllm()["metadata"]["name"]]["spec"]["ingress"]
    assert "from" not in api and "from" not in metrics


# ---- least privilege --------------------------------------------------------------------------

SINK_DEFAULT_PORTS = {"qdrant": 6333, "pgvector": 5432, "milvus": 19530}


def consumer_entries(v: dict) -> dict[str, dict]:
    """Enabled consumer entries by name, merged over the shared `consumer` settings as the chart does."""
    shared = {k: x for k, x in v["consumer"].items() if k not in ("image", "metricsPort", "logFormat")}
    out = {}
    for e in v["consumers"]:
        merged = {**copy.deepcopy(shared), **e}
        if merged.get("enabled", True):
            out[e["name"]] = merged
    return out


def expected_secret_env(v: dict, component: str, entry: dict | None = None) -> dict[str, tuple[str, str]]:
    """Env var -> (Secret, key): what a container needs, nothing more. vLLM writes the store and
    produces events (object store, Kafka, registry, HF token, API key); a consumer reads them
    and writes its own sink (object store with its own keys, Kafka with its own user, registry,
    its sink's Secret)."""
    consumer = component == "consumer"
    out = {}
    o = v["objectStore"]["credentials"]
    if o["source"] == "static":
        secret = (o.get("consumerExistingSecret") or o["existingSecret"]) if consumer else o["existingSecret"]
        out["AWS_ACCESS_KEY_ID"] = (secret, o["accessKeyIdKey"])
        out["AWS_SECRET_ACCESS_KEY"] = (secret, o["secretAccessKeyKey"])
        if o["sessionTokenKey"]:
            out["AWS_SESSION_TOKEN"] = (secret, o["sessionTokenKey"])
    k = v["kafka"]
    if k["securityProtocol"].startswith("SASL_"):
        sasl = k["sasl"]
        secret = (sasl.get("consumerExistingSecret") or sasl["existingSecret"]) if consumer else sasl["existingSecret"]
        out["VLLM_MM_EVENTS_KAFKA__SASL_USERNAME"] = (secret, sasl["usernameKey"])
        out["VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD"] = (secret, sasl["passwordKey"])
    if k["securityProtocol"] in ("SSL", "SASL_SSL") and k["tls"]["keyPassword"]["secretName"]:
        ref = k["tls"]["keyPassword"]
        out["VLLM_MM_EVENTS_KAFKA__SSL_KEY_PASSWORD"] = (ref["secretName"], ref["secretKey"])
    reg = k["schemaRegistry"]
    if reg["url"] and reg["basicAuth"]["secretName"]:
        out["VLLM_MM_EVENTS_SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO"] = (reg["basicAuth"]["secretName"],
                                                                       reg["basicAuth"]["secretKey"])
    if consumer:
        sink = entry["sink"]
        if sink["type"] in SINK_SECRET_ENV:
            field, env_name = SINK_SECRET_ENV[sink["type"]]
            if (sink.get(field) or {}).get("secretName"):
                out[env_name] = (sink[field]["secretName"], sink[field]["secretKey"])
        extra = entry.get("extraEnv", [])
    else:
        for field, env_name in (("hfToken", "HF_TOKEN"), ("apiKey", "VLLM_API_KEY")):
            if v["vllm"][field]["secretName"]:
                out[env_name] = (v["vllm"][field]["secretName"], v["vllm"][field]["secretKey"])
        extra = v["vllm"]["extraEnv"]
    for e in extra:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            out[e["name"]] = (ref["name"], ref["key"])
    return out


def expected_secret_volumes(v: dict, entry: dict | None = None) -> set[str]:
    """Secrets mounted as files: the Kafka and registry CAs and client certificate; a pgvector
    consumer's CA."""
    k, out = v["kafka"], set()
    if k["securityProtocol"] in ("SSL", "SASL_SSL"):
        out |= {s for s in (k["tls"]["caSecret"]["secretName"], k["tls"]["clientCertSecret"]["secretName"]) if s}
    if k["schemaRegistry"]["url"] and k["schemaRegistry"]["caSecret"]["secretName"]:
        out.add(k["schemaRegistry"]["caSecret"]["secretName"])
    if entry and entry["sink"]["type"] == "pgvector" and (entry["sink"].get("sslRootCert") or {}).get("secretName"):
        out.add(entry["sink"]["sslRootCert"]["secretName"])
    return out


def secret_env(c: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def secret_volumes(d: dict) -> set[str]:
    return {v["secret"]["secretName"] for v in pod_volumes(d).values() if "secret" in v}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_each_container_gets_exactly_the_secrets_it_needs(rendered, name):
    r, v = rendered[name], rendered[name].values
    entries = consumer_entries(v)
    sink_secrets = {ref["secretName"] for e in entries.values() for ref in e["sink"].values()
                    if isinstance(ref, dict) and ref.get("secretName")}
    for d in r.deployments("vllm"):
        env = secret_env(container(d))
        assert env == expected_secret_env(v, "vllm")
        assert secret_volumes(d) == expected_secret_volumes(v)
        assert not {"QDRANT_API_KEY", "PGPASSWORD", "MILVUS_TOKEN", "PGSSLROOTCERT"} & set(env_of(container(d)))
        assert not sink_secrets & ({s for s, _ in env.values()} | secret_volumes(d)), "vLLM must not see sink Secrets"
    for entry_name, entry in entries.items():
        d = r.consumer(entry_name)
        env = secret_env(container(d))
        assert env == expected_secret_env(v, "consumer", entry)
        assert secret_volumes(d) == expected_secret_volumes(v, entry)
        assert not {"HF_TOKEN", "VLLM_API_KEY"} & set(env_of(container(d)))
        own = {ref["secretName"] for ref in entry["sink"].values() if isinstance(ref, dict) and ref.get("secretName")}
        assert not (sink_secrets - own) & ({s for s, _ in env.values()} | secret_volumes(d)), \
            f"consumer {entry_name} sees another consumer's sink Secret"


def test_secret_split_is_real(rendered):
    """The expectations above are not vacuous: in least-privilege vLLM and the consumers use
    different object-store keys and Kafka users, and vLLM's env differs from a consumer's."""
    r = rendered["least-privilege"]
    vllm_env = secret_env(container(r.vllm()))
    assert vllm_env["AWS_ACCESS_KEY_ID"] == ("s3-writer", "AWS_ACCESS_KEY_ID")
    assert vllm_env["VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD"] == ("kafka-user-producer", "password")
    assert vllm_env["VLLM_API_KEY"] == ("vllm-api-key", "api-key")
    for d in r.deployments("consumer"):
        env = secret_env(container(d))
        assert env["AWS_ACCESS_KEY_ID"] == ("s3-reader", "AWS_ACCESS_KEY_ID")
        assert env["VLLM_MM_EVENTS_KAFKA__SASL_USERNAME"] == ("kafka-user-indexer", "username")
    assert secret_env(container(r.consumer("pgvector")))["PGPASSWORD"] == ("pg-indexer", "password")
    assert "QDRANT_API_KEY" not in env_of(container(r.consumer("pgvector")))
    assert "PGPASSWORD" not in env_of(container(r.consumer("qdrant")))


def test_keda_uses_the_consumers_kafka_user(rendered, tmp_path):
    (auth,) = rendered["kafka-sasl-ssl"].kind("TriggerAuthentication")
    assert {t["name"] for t in auth["spec"]["secretTargetRef"] if t["parameter"] == "password"} == {"kafka-user-vllm"}
    r = render_with(tmp_path, "kafka-sasl-ssl", {"kafka": {"sasl": {"consumerExistingSecret": "kafka-user-indexer"}}})
    (auth,) = r.kind("TriggerAuthentication")
    refs = {t["parameter"]: t["name"] for t in auth["spec"]["secretTargetRef"]}
    assert refs["username"] == refs["password"] == "kafka-user-indexer"
    assert secret_ref(container(r.vllm()), "VLLM_MM_EVENTS_KAFKA__SASL_PASSWORD")[0] == "kafka-user-vllm"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_one_service_account_per_component(rendered, name):
    r, v = rendered[name], rendered[name].values
    accounts = {sa["metadata"]["name"]: sa for sa in r.kind("ServiceAccount")}
    used = {}
    for d in r.kind("Deployment"):
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        spec = d["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == f"{RELEASE}-vllm-mm-events-{component}"
        assert spec["automountServiceAccountToken"] is False
        sa = accounts[spec["serviceAccountName"]]
        assert sa["automountServiceAccountToken"] is False
        assert sa["metadata"]["labels"]["app.kubernetes.io/component"] == component
        used[component] = sa["metadata"]["name"]
    # One per component that runs, none for a component that does not.
    assert set(accounts) == set(used.values())
    assert len(set(used.values())) == len(used)
    for component, sa_name in used.items():
        annotations = accounts[sa_name]["metadata"].get("annotations") or {}
        own = v["serviceAccount"][component]["annotations"]
        assert own.items() <= annotations.items()
        irsa = v["objectStore"]["credentials"]["source"] == "irsa"
        assert ("eks.amazonaws.com/role-arn" in annotations) == (irsa or "eks.amazonaws.com/role-arn" in own)


def test_service_account_options(tmp_path):
    r = render_with(tmp_path, "kafka-sasl-ssl", {"serviceAccount": {
        "vllm": {"create": False, "name": "gpu-runner"},
        "consumer": {"name": "indexer", "annotations": {"iam.gke.io/gcp-service-account": "reader@p.iam"},
                     "automountServiceAccountToken": True}}})
    (sa,) = r.kind("ServiceAccount")
    assert sa["metadata"]["name"] == "indexer"
    assert sa["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "reader@p.iam"}
    assert sa["automountServiceAccountToken"] is True
    assert r.vllm()["spec"]["template"]["spec"]["serviceAccountName"] == "gpu-runner"
    assert r.vllm()["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    for d in r.deployments("consumer"):
        assert d["spec"]["template"]["spec"]["serviceAccountName"] == "indexer"
        assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


def test_vllm_api_key_comes_from_a_secret_env_var(rendered):
    c = container(rendered["least-privilege"].vllm())
    assert secret_ref(c, "VLLM_API_KEY") == ("vllm-api-key", "api-key")
    assert not [a for a in argv(c) if a.startswith("--api-key")], "the key must not be on the command line"
    for name in VALUE_SETS:
        if name != "least-privilege" and rendered[name].deployments("vllm"):
            c = container(rendered[name].vllm())
            assert "VLLM_API_KEY" not in env_of(c) and "--api-key" not in argv(c)


def sink_tls_env(d: dict) -> dict[str, str]:
    return {n: e["value"] for n, e in env_of(container(d)).items()
            if n in ("QDRANT_HTTPS", "PGSSLMODE", "PGSSLROOTCERT")}


def test_tls_to_the_stores_is_on_by_default(rendered, tmp_path):
    # Qdrant: https unless turned off; the sink reads QDRANT_HTTPS ("1"/"true").
    for name in ("minimal", "sink-qdrant", "least-privilege"):
        assert sink_tls_env(rendered[name].consumer("qdrant")) == {"QDRANT_HTTPS": "true"}
    # pgvector: sslmode require by default, verify-full with a mounted CA when asked for.
    pg = {"name": "pg", "sink": {"type": "pgvector", "uri": "pgvector://u@pg:5432/db/t"}}
    r = render_with(tmp_path, "default", {"consumers": [pg, {**QDRANT, "sink": {**QDRANT["sink"], "https": False}}]})
    assert sink_tls_env(r.consumer("pg")) == {"PGSSLMODE": "require"}
    assert not secret_volumes(r.consumer("pg"))
    assert sink_tls_env(r.consumer("q")) == {"QDRANT_HTTPS": "false"}
    for name in ("sink-pgvector", "least-privilege"):
        d = rendered[name].consumer("pgvector")
        env = sink_tls_env(d)
        assert env["PGSSLMODE"] == "verify-full"
        ca = env["PGSSLROOTCERT"]
        mount = mounts(container(d))[str(Path(ca).parent)]
        assert mount["readOnly"] is True
        vol = pod_volumes(d)[mount["name"]]["secret"]
        assert (vol["secretName"], vol["items"]) == ("pg-ca", [{"key": "ca.crt", "path": Path(ca).name}])
    # Milvus: the sink has no TLS setting (it connects over http://), so the chart sets none.
    assert sink_tls_env(rendered["sink-milvus"].consumer("milvus")) == {}


# NetworkPolicy

def network_policies(r: Rendered) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in r.kind("NetworkPolicy")}


def selected_deployment(r: Rendered, policy: dict) -> dict:
    sel = policy["spec"]["podSelector"]["matchLabels"]
    (d,) = [d for d in r.kind("Deployment") if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    return d


def egress_ports(policy: dict) -> list[set[tuple]]:
    return [{(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]} for rule in policy["spec"]["egress"]]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_network_policies_only_when_enabled(rendered, name):
    r = rendered[name]
    policies = network_policies(r)
    if not r.values["networkPolicy"]["enabled"]:
        assert not policies
        return
    # One per Deployment, each selecting exactly it.
    assert sorted(policies) == sorted(d["metadata"]["name"] for d in r.kind("Deployment"))
    for policy_name, p in policies.items():
        d = selected_deployment(r, p)
        assert d["metadata"]["name"] == policy_name
        spec = p["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        # Ingress: the container's own ports (one rule each: vLLM's API and the publisher's
        # metrics, a consumer's metrics), nothing else.
        assert [rule["ports"] for rule in spec["ingress"]] == [
            [{"port": port["containerPort"], "protocol": "TCP"}] for port in container(d)["ports"]]
        # Egress: every rule names its ports (no rule opens every port).
        assert spec["egress"] and all(rule.get("ports") for rule in spec["egress"])


def test_network_policies_with_peers(rendered):
    r = rendered["least-privilege"]
    np = r.values["networkPolicy"]
    policies = network_policies(r)
    dns, store, kafka = (
        (np["dns"]["to"], [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]),
        ([{"ipBlock": {"cidr": "10.20.0.0/24"}}], [{"port": 9000, "protocol": "TCP"}]),
        (np["kafka"]["to"], [{"port": 9093, "protocol": "TCP"}]))
    common = [{"to": to, "ports": ports} for to, ports in (dns, store, kafka)]
    vllm = policies[r.vllm()["metadata"]["name"]]["spec"]
    assert vllm["ingress"][0]["from"] == np["vllm"]["ingressFrom"]
    assert vllm["ingress"][1]["ports"] == [{"port": r.values["publisher"]["metricsPort"], "protocol": "TCP"}]
    assert vllm["ingress"][1]["from"] == np["vllm"]["metricsFrom"] != np["vllm"]["ingressFrom"]
    assert vllm["egress"] == common, "vLLM: DNS, object store, Kafka; no Hugging Face (huggingFace.enabled false)"
    sinks = {"qdrant": [{"to": np["sinks"]["qdrant"]["to"], "ports": [{"port": 6333, "protocol": "TCP"}]}],
             "pgvector": [{"to": [{"ipBlock": {"cidr": "10.30.5.10/32"}}],
                           "ports": [{"port": 5432, "protocol": "TCP"}]}],
             "lancedb": []}
    for name, extra in sinks.items():
        spec = policies[r.consumer(name)["metadata"]["name"]]["spec"]
        assert spec["ingress"][0]["from"] == np["consumer"]["ingressFrom"]
        assert spec["egress"] == common + extra, name


def test_network_policy_ports_are_derived_from_the_values(rendered, tmp_path):
    """Enabled without peers: any address, but only on the ports the values name."""
    r = render_with(tmp_path, "kafka-sasl-ssl", {"networkPolicy": {"enabled": True}})
    policies = network_policies(r)
    tcp = lambda *ports: [{(p, "TCP")} for p in ports]  # noqa: E731
    dns = [{(53, "UDP"), (53, "TCP")}]
    # https://minio.storage.svc:9000, kafka-*:9093, https://schema-registry.kafka.svc:8081, the Hub on 443.
    assert egress_ports(policies[r.vllm()["metadata"]["name"]]) == dns + tcp(9000, 9093, 8081, 443)
    assert egress_ports(policies[r.consumer("qdrant")["metadata"]["name"]]) == dns + tcp(9000, 9093, 8081, 6333)
    assert egress_ports(policies[r.consumer("milvus")["metadata"]["name"]]) == dns + tcp(9000, 9093, 8081, 19530)
    for p in policies.values():
        assert [rule for rule in p["spec"]["egress"] if "to" not in rule], "no peers given: any address"
        assert "from" not in p["spec"]["ingress"][0]
    # AWS S3 (no endpoint): 443; a plain-http endpoint without a port: 80; extra rules appended.
    extra = {"to": [{"ipBlock": {"cidr": "169.254.169.254/32"}}], "ports": [{"port": 80, "protocol": "TCP"}]}
    r = render_with(tmp_path, "aws-irsa", {"networkPolicy": {"enabled": True, "vllm": {"extraEgress": [extra]}}})
    vllm = network_policies(r)[r.vllm()["metadata"]["name"]]["spec"]["egress"]
    assert egress_ports({"spec": {"egress": vllm}}) == dns + tcp(443, 9092, 443) + [{(80, "TCP")}]
    assert vllm[-1] == extra
    r = render_with(tmp_path, "sink-lancedb", {"networkPolicy": {"enabled": True},
                                               "objectStore": {"endpointUrl": "http://minio.minio.svc"}})
    (p,) = [p for p in r.kind("NetworkPolicy") if "consumer" in p["metadata"]["name"]]
    assert egress_ports(p) == dns + tcp(80, 9092)


# ---- NOTES.txt ------------------------------------------------------------------------------

def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it (which needs a cluster): in a copy of the
    chart its text is defined as a named template and rendered into a ConfigMap."""
    import shutil

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_probe.tpl").write_text('{{- define "notes.probe" -}}' + notes + "{{- end }}")
    (chart / "templates" / "notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "notes.probe" . | toJson }}\n')
    res = run_helm("template", RELEASE, str(chart), "--show-only", "templates/notes-probe.yaml", *args)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)["data"]["notes"]


def test_notes(tmp_path):
    text = render_notes(tmp_path)
    assert "No consumers are configured" in text and "source=chain sets no credentials" in text
    assert "port-forward svc/mme-vllm-mm-events-vllm 8000:8000" in text
    text = render_notes(tmp_path / "2", "-f", str(CI_VALUES["kafka-sasl-ssl"]),
                        "--set", "consumers[1].replicas=20", "--set", "publisher.topicPartitions=12")
    assert "curl -s https://vllm.example.com/v1/chat/completions" in text
    assert "mme-vllm-mm-events-consumer-milvus: milvus-indexer -> milvus://" in text
    assert "20 replicas for 12 partitions: 8 would sit idle" in text
    assert "Replicas above the topic's partition count sit idle" in text


def test_notes_describe_the_publisher_outbox_and_metrics(tmp_path):
    text = render_notes(tmp_path / "default")
    assert "Publisher outbox: /var/lib/vllm-mm-events/spool on an emptyDir of 1280Mi." in text
    assert "not the loss of the pod" in text
    assert "port-forward svc/mme-vllm-mm-events-vllm-metrics 9401:9401" in text
    text = render_notes(tmp_path / "pvc", "-f", str(CI_VALUES["publisher-spool-pvc"]))
    assert "on PersistentVolumeClaim mme-vllm-mm-events-vllm-spool." in text
    assert "port-forward svc/mme-vllm-mm-events-vllm-metrics 9500:9500" in text
    text = render_notes(tmp_path / "off", "--set", "publisher.spool.enabled=false", "--set", "publisher.metricsPort=0")
    assert "Publisher outbox: off" in text and "Publisher metrics" not in text


def warnings_in(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("WARNING:")]


def test_notes_warn_about_plaintext_connections(tmp_path):
    # Defaults: Kafka PLAINTEXT, no API key, no NetworkPolicy.
    text = render_notes(tmp_path / "default")
    (kafka,) = warnings_in(text)
    assert "Kafka uses PLAINTEXT" in kafka and "SASL_SSL" in kafka
    assert "Note: vllm.apiKey is not set" in text and "Note: networkPolicy.enabled=false" in text
    # An http object store, SASL_PLAINTEXT with PLAIN, an http registry with basic auth, Qdrant
    # without https, pgvector without TLS, Milvus (no TLS in its sink).
    text = render_notes(tmp_path / "plain", "-f", str(CI_VALUES["minimal"]), "-f", str(CI_VALUES["sink-milvus"]),
                        "--set", "kafka.securityProtocol=SASL_PLAINTEXT", "--set", "kafka.sasl.mechanism=PLAIN",
                        "--set", "kafka.sasl.existingSecret=k",
                        "--set", "kafka.schemaRegistry.url=http://registry:8081",
                        "--set", "kafka.schemaRegistry.basicAuth.secretName=r",
                        "--set", "kafka.schemaRegistry.basicAuth.secretKey=user-info",
                        "--set", "consumers[1].name=q", "--set", "consumers[1].sink.type=qdrant",
                        "--set", "consumers[1].sink.uri=qdrant://q:6333/c", "--set", "consumers[1].sink.https=false",
                        "--set", "consumers[2].name=pg", "--set", "consumers[2].sink.type=pgvector",
                        "--set", "consumers[2].sink.uri=pgvector://u@pg:5432/d/t",
                        "--set", "consumers[2].sink.sslMode=prefer")
    warned = "\n".join(warnings_in(text))
    for expected in ("Kafka uses SASL_PLAINTEXT", "with SASL PLAIN so does the password",
                     "object store endpoint http://minio.minio.svc.cluster.local:9000 is plain http",
                     "Schema Registry http://registry:8081 is plain http: its basic-auth credentials",
                     "Consumer q: https is off", "Consumer pg: sslMode prefer does not require TLS",
                     "Consumer milvus: the Milvus sink connects over plain http", "and the token"):
        assert expected in warned, f"{expected!r} not in:\n{warned}"
    assert len(warnings_in(text)) == 6
    # Least privilege: nothing to warn about, and the curl example sends the API key.
    text = render_notes(tmp_path / "lp", "-f", str(CI_VALUES["least-privilege"]))
    assert not warnings_in(text) and "Security warnings" not in text
    assert "Note: vllm.apiKey" not in text and "Note: networkPolicy" not in text
    assert "get secret vllm-api-key -o jsonpath='{.data.api-key}' | base64 -d" in text
    assert '-H "Authorization: Bearer $VLLM_API_KEY"' in text
    # pgvector with sslmode require (the default): encrypted, but the notes point at verify-full.
    text = render_notes(tmp_path / "pg", "--set", "consumers[0].name=pg", "--set", "consumers[0].sink.type=pgvector",
                        "--set", "consumers[0].sink.uri=pgvector://u@pg:5432/d/t")
    assert "Note: Consumer pg: sslMode require encrypts but does not check" in text


# ---- Grafana dashboards -------------------------------------------------------------------------

DASHBOARD_DIR = CHART / "dashboards"
# board -> the metric namespace of the code it shows (consumers/metrics.py, publisher/sidecar/metrics.py)
BOARDS = {"publisher": "vllm_mm_events_publisher", "consumer": "vllm_mm_events_consumer"}
# A metric of this project in a query: the whole identifier, so that a longer name is not cut short.
METRIC_REF = re.compile(r"(?<![A-Za-z0-9_:])vllm_mm_events_(?:consumer|publisher)_[A-Za-z0-9_:]+")
# The series Prometheus stores for a family of each type (prometheus_client's exposition).
SERIES_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
# Every panel query selects the dashboard's variables.
PANEL_SELECTOR = '{namespace="$namespace", job=~"$job", pod=~"$pod"}'
RATE_CALL = re.compile(r"\b(?:rate|irate|increase)\($")
QUANTILE_CALL = re.compile(r"histogram_quantile\(\s*[0-9.]+\s*,\s*sum by \(([^)]*)\)\s*\(rate\($")
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)$")
# Exported metric families deliberately left off the dashboards: family name -> why. Every family
# the code exports must be on its dashboard or here (new metrics are not silently missed), and an
# entry here must name an exported family that no panel shows (stale entries fail). None so far.
NOT_ON_DASHBOARDS: dict[str, str] = {}
PUBLISHER_FAMILIES = """
import json
import math
from prometheus_client import REGISTRY
from publisher.sidecar.metrics import NS, PublisherMetrics
PublisherMetrics()
print(json.dumps({f.name: f.type for f in REGISTRY.collect() if f.name.startswith(NS + "_")}))
"""


@pytest.fixture(scope="session")
def exported_metrics() -> dict[str, dict[str, str]]:
    """board -> {metric family: type}, from the code. The consumer's metrics live in a registry of
    their own; PublisherMetrics registers into prometheus_client's default REGISTRY (it cannot be
    instantiated twice in one process), so it is built and collected in a fresh interpreter."""
    from consumers.metrics import ConsumerMetrics

    consumer = {f.name: f.type for f in ConsumerMetrics().registry.collect()}
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    res = subprocess.run([sys.executable, "-c", PUBLISHER_FAMILIES], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    publisher = json.loads(res.stdout)
    return {"consumer": consumer, "publisher": publisher}


def test_exported_metrics_come_from_the_code(exported_metrics):
    """The names the dashboards are checked against are the code's: every report counter of the
    publisher's COUNTERS, its gauges and histograms; the consumer's counters, gauges, histograms."""
    from publisher.sidecar.metrics import COUNTERS

    pub = exported_metrics["publisher"]
    for metric, _ in COUNTERS.values():
        assert pub.get(f"{BOARDS['publisher']}_{metric}") == "counter", metric
    assert len(pub) > len(COUNTERS)
    for board, families in exported_metrics.items():
        assert set(families.values()) == {"counter", "gauge", "histogram"}, families
        assert all(name.startswith(BOARDS[board] + "_") for name in families), families


def series_of(families: dict[str, str]) -> dict[str, str]:
    """series name -> its family, as Prometheus stores them."""
    out = {}
    for name, typ in families.items():
        assert typ in SERIES_SUFFIXES, f"{name}: a {typ} metric; teach SERIES_SUFFIXES its series"
        out.update({name + suffix: name for suffix in SERIES_SUFFIXES[typ]})
    return out


def test_series_suffixes_are_those_of_the_exposition(exported_metrics):
    """SERIES_SUFFIXES matches what prometheus_client really exposes: in a scrape of the
    consumer's metrics, each family without labels (at least one of each type) has exactly the
    series series_of() gives it."""
    from prometheus_client.parser import text_string_to_metric_families

    from consumers.metrics import ConsumerMetrics

    families = exported_metrics["consumer"]
    scraped = {f.name: {s.name for s in f.samples if not s.name.endswith("_created")}
               for f in text_string_to_metric_families(ConsumerMetrics().render().decode())}
    scraped = {name: series for name, series in scraped.items() if series}
    assert {families[name] for name in scraped} == set(SERIES_SUFFIXES)
    for name, series in scraped.items():
        assert series == {s for s, family in series_of(families).items() if family == name}, name


def dashboard(board: str) -> dict:
    return json.loads((DASHBOARD_DIR / f"{board}.json").read_text())


def all_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def panel_queries(d: dict) -> list[tuple[str, str]]:
    """(where, expr) of every panel target."""
    return [(f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"])
            for p in all_panels(d["panels"]) for t in p.get("targets", [])]


def variable_queries(d: dict) -> list[tuple[str, str]]:
    """(where, selector) of every query variable: label_values(<selector>, <label>)."""
    out = []
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = LABEL_VALUES.match(q)
            assert m, f"variable {v['name']}: {q!r} is not label_values(<selector>, <label>)"
            out.append((f"variable {v['name']}", m[1]))
    return out


def dashboard_problems(d: dict) -> list[str]:
    """What is wrong with a dashboard's structure (empty: nothing)."""
    problems = []
    ds = {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    if not (36 <= d.get("schemaVersion", 0) <= 41):
        problems.append(f"schemaVersion {d.get('schemaVersion')}")
    if not d.get("uid") or not d.get("title"):
        problems.append("no uid or title")
    source = variables.get("datasource", {})
    if (source.get("type"), source.get("query")) != ("datasource", "prometheus"):
        problems.append(f"no prometheus data source variable: {source}")
    for name in ("namespace", "job", "pod"):
        v = variables.get(name, {})
        if v.get("type") != "query" or v.get("datasource") != ds:
            problems.append(f"variable {name}: not a query of ${{datasource}}: {v}")
    ids = [p.get("id") for p in all_panels(d["panels"])]
    if len(ids) != len(set(ids)) or not all(isinstance(i, int) for i in ids):
        problems.append(f"panel ids not unique integers: {ids}")
    cells: dict[tuple[int, int], int] = {}
    for p in all_panels(d["panels"]):
        g = p["gridPos"]
        if not (0 <= g["x"] and 0 < g["w"] and g["x"] + g["w"] <= 24 and g["h"] > 0):
            problems.append(f"panel {p['id']}: gridPos {g} outside the 24 columns")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"panel {p['id']} overlaps panel {cells[(x, y)]}")
                    break
                cells[(x, y)] = p["id"]
            else:
                continue
            break
        if p["type"] == "row":
            continue
        targets = p.get("targets", [])
        if p.get("datasource") != ds or not targets:
            problems.append(f"panel {p['id']}: datasource {p.get('datasource')}, {len(targets)} targets")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            problems.append(f"panel {p['id']}: refIds {refs}")
        for t in targets:
            if t.get("datasource") != ds or not t.get("expr"):
                problems.append(f"panel {p['id']} target {t.get('refId')}: {t}")
    return problems


def query_problems(board: str, d: dict, exported: dict[str, str]) -> list[str]:
    """Queries of metrics the code does not export, or used against their type (empty: none)."""
    problems = []
    series = series_of(exported)
    for where, expr in [*panel_queries(d), *variable_queries(d)]:
        refs = list(METRIC_REF.finditer(expr))
        if not refs:
            problems.append(f"{where}: no vllm_mm_events metric in {expr!r}")
        for m in refs:
            name, before, after = m[0], expr[:m.start()], expr[m.end():]
            if not name.startswith(BOARDS[board] + "_"):
                problems.append(f"{where}: {name} belongs to another dashboard")
            elif name not in series:
                problems.append(f"{where}: {name} is not exported by the code (known series: {sorted(series)})")
            if not where.startswith("panel") or name not in series:
                continue
            if not after.startswith(PANEL_SELECTOR):
                problems.append(f"{where}: {name} without the selector {PANEL_SELECTOR}")
            typ = exported[series[name]]
            if typ in ("counter", "histogram") and not RATE_CALL.search(before):
                problems.append(f"{where}: {name} ({typ}) outside rate()/increase()")
            if typ == "gauge" and RATE_CALL.search(before):
                problems.append(f"{where}: rate() of the gauge {name}")
            if name.endswith("_bucket"):
                q = QUANTILE_CALL.search(before)
                if not q or "le" not in [label.strip() for label in q[1].split(",")]:
                    problems.append(f"{where}: {name} not in histogram_quantile(q, sum by (..., le) (rate(...)))")
    return problems


def families_shown(d: dict, exported: dict[str, str]) -> set[str]:
    series = series_of(exported)
    return {series[m] for _, expr in panel_queries(d) for m in METRIC_REF.findall(expr) if m in series}


def expected_boards(v: dict) -> list[str]:
    if not v["metrics"].get("grafanaDashboards", {}).get("enabled"):
        return []
    boards = []
    if v["vllm"]["enabled"] and v["publisher"]["metricsPort"] > 0:
        boards.append("publisher")
    if consumer_entries(v):
        boards.append("consumer")
    return boards


def dashboard_maps(r: Rendered) -> dict[str, dict]:
    """board -> its ConfigMap."""
    prefix = f"{RELEASE}-vllm-mm-events-dashboard-"
    return {cm["metadata"]["name"][len(prefix):]: cm for cm in r.kind("ConfigMap")
            if cm["metadata"]["name"].startswith(prefix)}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_grafana_dashboards_only_when_enabled(rendered, name):
    """metrics.grafanaDashboards.enabled (default false): the publisher's dashboard with vLLM and
    its metrics port, the consumers' with a consumer, each in a ConfigMap holding its JSON file."""
    r = rendered[name]
    maps = dashboard_maps(r)
    assert list(maps) == expected_boards(r.values)
    for board, cm in maps.items():
        assert list(cm["data"]) == [f"vllm-mm-events-{board}.json"]
        assert json.loads(cm["data"][f"vllm-mm-events-{board}.json"]) == dashboard(board)
    assert not rendered["default"].values["metrics"]["grafanaDashboards"]["enabled"]
    assert list(dashboard_maps(rendered["kafka-sasl-ssl"])) == ["publisher", "consumer"]


def test_grafana_dashboard_configmaps(rendered, tmp_path):
    """The label the Grafana sidecar watches (grafana_dashboard: "1" by default), annotations
    (grafana_folder), the namespace (default: the release's), the chart's labels."""
    r = rendered["kafka-sasl-ssl"]
    for board, cm in dashboard_maps(r).items():
        meta = cm["metadata"]
        assert meta["namespace"] == "mm"
        assert meta["labels"]["grafana_dashboard"] == "1"
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["app.kubernetes.io/component"] == ("vllm" if board == "publisher" else "consumer")
        assert meta["annotations"] == {"grafana_folder": "vLLM"}
    r = render_with(tmp_path, "sink-qdrant", {"metrics": {"grafanaDashboards": {
        "enabled": True, "namespace": "monitoring", "labels": {"grafana_dashboard": "vllm", "team": "ml"}}}})
    maps = dashboard_maps(r)
    assert list(maps) == ["publisher", "consumer"]
    for cm in maps.values():
        assert cm["metadata"]["namespace"] == "monitoring" and "annotations" not in cm["metadata"]
        assert {"grafana_dashboard": "vllm", "team": "ml"}.items() <= cm["metadata"]["labels"].items()
    # Only the dashboards of what the release runs.
    no_port = render_with(tmp_path, "sink-qdrant", {"publisher": {"metricsPort": 0},
                                                     "metrics": {"grafanaDashboards": {"enabled": True}}})
    assert list(dashboard_maps(no_port)) == ["consumer"]
    no_consumers = render_with(tmp_path, "default", {"metrics": {"grafanaDashboards": {"enabled": True}}})
    assert list(dashboard_maps(no_consumers)) == ["publisher"]
    consumers_only = render_with(tmp_path, "minimal", {"vllm": {"enabled": False},
                                                       "metrics": {"grafanaDashboards": {"enabled": True}}})
    assert list(dashboard_maps(consumers_only)) == ["consumer"]
    kubeconform_ok(tmp_path, r, no_port, no_consumers, consumers_only)


def test_notes_name_the_dashboards(tmp_path):
    text = render_notes(tmp_path / "on", "-f", str(CI_VALUES["kafka-sasl-ssl"]))
    assert 'ConfigMap default/mme-vllm-mm-events-dashboard-publisher: "vLLM MM Events / Publisher"' in text
    assert 'ConfigMap default/mme-vllm-mm-events-dashboard-consumer: "vLLM MM Events / Consumers"' in text
    assert "watches that namespace for grafana_dashboard=1 loads them" in text
    assert "serviceMonitor.enabled=false" not in text
    text = render_notes(tmp_path / "ns", "--set", "metrics.grafanaDashboards.enabled=true",
                        "--set", "metrics.grafanaDashboards.namespace=monitoring")
    assert "ConfigMap monitoring/mme-vllm-mm-events-dashboard-publisher" in text and "dashboard-consumer" not in text
    assert "metrics.serviceMonitor.enabled=false: they show data only if" in text
    assert "Grafana dashboards" not in render_notes(tmp_path / "off")


@pytest.mark.parametrize("board", BOARDS)
def test_grafana_dashboard_is_well_formed(board):
    """A Grafana JSON model: a Prometheus data source variable that every panel and target uses,
    namespace/job/pod variables, unique integer panel ids, panels inside the grid, not overlapping."""
    d = dashboard(board)
    assert dashboard_problems(d) == []
    assert d["uid"] == f"vllm-mm-events-{board}" and len(d["uid"]) <= 40
    assert [p for p in all_panels(d["panels"]) if p["type"] != "row"]


def test_dashboard_checks_catch_mistakes():
    """The structure checks are real: a duplicate panel id, a hard-coded data source, a missing
    variable and overlapping panels are each reported."""
    d = dashboard("consumer")
    panels = [p for p in d["panels"] if p["type"] != "row"]
    panels[1]["id"] = panels[0]["id"]
    panels[2]["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    panels[3]["gridPos"] = dict(panels[4]["gridPos"])
    d["templating"]["list"] = [v for v in d["templating"]["list"] if v["name"] != "pod"]
    problems = "\n".join(dashboard_problems(d))
    for expected in ("panel ids not unique", f"panel {panels[2]['id']}: datasource", "variable pod",
                     f"panel {panels[4]['id']} overlaps panel {panels[3]['id']}"):
        assert expected in problems, problems


@pytest.mark.parametrize("board", BOARDS)
def test_dashboard_queries_only_metrics_the_code_exports(board, exported_metrics):
    """Every metric a panel or variable queries is a series the code exports (counters as _total,
    histograms as _bucket/_sum/_count), used as its type allows (counters and histograms through
    rate/increase, buckets in histogram_quantile by le, gauges as they are), with the variables."""
    d = dashboard(board)
    assert query_problems(board, d, exported_metrics[board]) == []
    assert len(panel_queries(d)) >= len(exported_metrics[board])


def test_query_checks_catch_mistakes(exported_metrics):
    """The metric check is real: a renamed metric, a counter without _total, a family of the other
    component, a gauge under rate(), a counter read raw and a quantile without le are reported."""
    d = dashboard("consumer")
    sel = PANEL_SELECTOR
    c = "vllm_mm_events_consumer"
    bad = {
        f"{c}_events_consumd_total is not": f"sum(rate({c}_events_consumd_total{sel}[5m]))",
        f"{c}_events_consumed is not": f"sum(rate({c}_events_consumed{sel}[5m]))",
        "belongs to another": f"sum(rate(vllm_mm_events_publisher_events_published_total{sel}[5m]))",
        "rate() of the gauge": f"sum(rate({c}_lag_events{sel}[5m]))",
        "(counter) outside rate()": f"sum({c}_errors_total{sel})",
        "not in histogram_quantile": f"histogram_quantile(0.5, sum by (job) (rate({c}_batch_seconds_bucket{sel}[5m])))",
        "without the selector": f"sum(rate({c}_events_consumed_total[5m]))",
        "no vllm_mm_events metric": "sum(rate(up[5m]))",
    }
    panel = next(p for p in d["panels"] if p["type"] != "row")
    for expected, expr in bad.items():
        panel["targets"] = [{"refId": "A", "expr": expr, "datasource": panel["datasource"]}]
        problems = "\n".join(query_problems("consumer", d, exported_metrics["consumer"]))
        assert expected in problems, f"{expr}:\n{problems}"


def coverage_problems(board: str, d: dict, families: dict[str, str], omitted: dict[str, str]) -> list[str]:
    """Exported families on no panel and not in ``omitted``; stale ``omitted`` entries."""
    shown = families_shown(d, families)
    mine = {name for name in omitted if name.startswith(BOARDS[board] + "_")}
    return ([f"{name}: exported but on no panel" for name in sorted(set(families) - mine - shown)]
            + [f"NOT_ON_DASHBOARDS: {name} is not exported" for name in sorted(mine - set(families))]
            + [f"NOT_ON_DASHBOARDS: {name} is on a panel" for name in sorted(mine & shown)])


@pytest.mark.parametrize("board", BOARDS)
def test_every_exported_metric_is_on_its_dashboard(board, exported_metrics):
    """A metric added to the code fails this test until a panel shows it (or NOT_ON_DASHBOARDS
    says why not)."""
    assert coverage_problems(board, dashboard(board), exported_metrics[board], NOT_ON_DASHBOARDS) == []


def test_coverage_check_catches_mistakes(exported_metrics):
    """A metric no panel shows, an allowlisted metric that is shown, an allowlisted one the code
    does not export: each reported; an allowlisted metric no panel shows is fine."""
    families = exported_metrics["consumer"]
    lag = "vllm_mm_events_consumer_lag_events"
    d = dashboard("consumer")
    assert coverage_problems("consumer", d, families, {lag: "why"}) == [f"NOT_ON_DASHBOARDS: {lag} is on a panel"]
    gone = "vllm_mm_events_consumer_gone"
    assert coverage_problems("consumer", d, families, {gone: "why"}) == [f"NOT_ON_DASHBOARDS: {gone} is not exported"]
    d["panels"] = [p for p in all_panels(d["panels"])
                   if not any(lag in t["expr"] for t in p.get("targets", []))]
    assert coverage_problems("consumer", d, families, {}) == [f"{lag}: exported but on no panel"]
    assert coverage_problems("consumer", d, families, {lag: "why"}) == []


# PromQL, checked by Prometheus's own parser (tests/helm/promqlcheck, built with go on first use).
PROMQLCHECK_SRC = Path(__file__).with_name("promqlcheck")
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}


def promqlcheck_binary() -> Path:
    digest = hashlib.sha256(b"".join((PROMQLCHECK_SRC / f).read_bytes()
                                     for f in ("go.mod", "go.sum", "main.go"))).hexdigest()[:12]
    target = k8s_tools.CACHE / f"promqlcheck-{digest}" / "promqlcheck"
    if target.exists():
        return target
    if not shutil.which("go"):
        raise RuntimeError("promqlcheck is built from tests/helm/promqlcheck with go; go is not on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"promqlcheck.{os.getpid()}.tmp")
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=readonly -buildvcs=false")
    subprocess.run(["go", "build", "-trimpath", "-o", str(tmp), "."], cwd=PROMQLCHECK_SRC, env=env, check=True,
                   timeout=900)
    tmp.replace(target)
    return target


def parse_promql(exprs: list[str]) -> list[dict]:
    """Each expression's parser error ("" if none) and the metric names of its selectors."""
    for macro, value in GRAFANA_MACROS.items():
        exprs = [e.replace(macro, value) for e in exprs]
    res = subprocess.run([str(promqlcheck_binary())], input="".join(json.dumps(e) + "\n" for e in exprs),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("board", BOARDS)
def test_dashboard_queries_are_valid_promql(board):
    """Every query parses with Prometheus's parser (Grafana's $__rate_interval and $__range as
    durations), and its selectors are exactly the metrics METRIC_REF found: none is missed."""
    d = dashboard(board)
    queries = [*panel_queries(d), *variable_queries(d)]
    for (where, expr), result in zip(queries, parse_promql([e for _, e in queries]), strict=True):
        assert result["error"] == "", f"{where}: {expr}\n{result['error']}"
        assert result["metrics"] == sorted(set(METRIC_REF.findall(expr))), f"{where}: {expr}"


def test_promql_check_is_real():
    bad, renamed, ok = parse_promql(['sum(rate(x_total{a="1"}[$__rate_interval])', '{__name__="x"}',
                                     "histogram_quantile(0.5, sum by (le) (rate(x_bucket[$__range])))"])
    assert "unclosed left parenthesis" in bad["error"] or "parse error" in bad["error"]
    assert renamed["metrics"] == [""]  # no literal name: it differs from what METRIC_REF finds
    assert ok == {"error": "", "metrics": ["x_bucket"]}


def readme_alerts() -> list[tuple[str, str]]:
    """(alert, expression) of every row of the README's alert tables (header ``| alert | expression |``)."""
    rows, in_table = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("| alert | expression |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("|---"):
            alert, expr, _means = (c.strip() for c in line.strip().strip("|").split("|", 2))
            assert expr.count("`") == 2 and expr.startswith("`") and expr.endswith("`"), line
            rows.append((alert, expr.strip("`")))
    return rows


def test_readme_alerts_are_valid_promql_over_exported_metrics(exported_metrics):
    """What the README tells operators to alert on parses with Prometheus's parser and names only series the
    code exports (and ``up``): a renamed metric would leave an alert that never fires."""
    alerts = readme_alerts()
    assert {a for a, _ in alerts} >= {"stuck", "not committing", "retrying"}, alerts  # both tables are read
    series = {**series_of(exported_metrics["publisher"]), **series_of(exported_metrics["consumer"]), "up": "up"}
    for (alert, expr), result in zip(alerts, parse_promql([e for _, e in alerts]), strict=True):
        assert result["error"] == "", f"{alert}: {expr}\n{result['error']}"
        assert result["metrics"] and set(result["metrics"]) <= set(series), f"{alert}: {expr}: {result['metrics']}"


# ---- rejected values --------------------------------------------------------------------------

QDRANT = {"name": "q", "sink": {"type": "qdrant", "uri": "qdrant://qdrant:6333/c"}}

REJECTED = {
    # name: (values, [substrings the error must contain])
    "replicas-string": ({"consumers": [{**QDRANT, "replicas": "2"}]},
                        ["/consumers/0/replicas", "got string, want integer"]),
    "vllm-replicas-string": ({"vllm": {"replicaCount": "one"}}, ["/vllm/replicaCount", "want integer"]),
    "missing-bucket": ({"objectStore": {"bucket": None}}, ["/objectStore", "missing property 'bucket'"]),
    "empty-bucket": ({"objectStore": {"bucket": ""}}, ["/objectStore/bucket"]),
    "unknown-sink": ({"consumers": [{"name": "r", "sink": {"type": "redis", "uri": "redis://r:6379/0"}}]},
                     ["/consumers/0/sink/type", "value must be one of 'qdrant', 'pgvector', 'milvus', 'lancedb'"]),
    "consumer-without-sink": ({"consumers": [{"name": "q"}]}, ["/consumers/0", "missing property 'sink'"]),
    "password-in-sink-uri": ({"consumers": [{"name": "p", "sink": {
        "type": "pgvector", "uri": "pgvector://user:hunter2@pg:5432/db/t"}}]}, ["/consumers/0/sink/uri"]),
    "wrong-secret-for-sink": ({"consumers": [{**QDRANT, "sink": {**QDRANT["sink"], "password": {
        "secretName": "s", "secretKey": "k"}}}]}, ["/consumers/0/sink", "additional properties 'password'"]),
    "bad-consumer-name": ({"consumers": [{**QDRANT, "name": "Qdrant_1"}]}, ["/consumers/0/name"]),
    "unknown-pooling": ({"consumers": [{**QDRANT, "pooling": "avg"}]}, ["/consumers/0/pooling", "'mean'"]),
    "sasl-without-secret": ({"kafka": {"securityProtocol": "SASL_SSL"}}, ["/kafka/sasl/existingSecret"]),
    "secret-in-kafka-config": ({"kafka": {"config": {"sasl.password": "hunter2"}}},
                               ["/kafka/config/sasl.password", "Secret reference"]),
    "static-without-secret": ({"objectStore": {"credentials": {"source": "static"}}},
                              ["/objectStore/credentials/existingSecret"]),
    "irsa-without-role": ({"objectStore": {"credentials": {"source": "irsa"}}},
                          ["/objectStore/credentials/irsaRoleArn"]),
    "bad-bootstrap": ({"kafka": {"bootstrapServers": ["kafka"]}}, ["/kafka/bootstrapServers/0"]),
    "bad-dtype": ({"publisher": {"storageDtype": "int8"}}, ["/publisher/storageDtype", "'bfloat16'"]),
    "typo-top-level": ({"vlm": {"model": "x"}}, ["additional properties 'vlm' not allowed"]),
    "no-limits": ({"vllm": {"resources": {"limits": None}}}, ["/vllm/resources", "missing property 'limits'"]),
    "root": ({"consumer": {"podSecurityContext": {"runAsNonRoot": False}}},
             ["/consumer/podSecurityContext/runAsNonRoot"]),
    "privilege-escalation": ({"vllm": {"securityContext": {"allowPrivilegeEscalation": True}}},
                             ["/vllm/securityContext/allowPrivilegeEscalation"]),
    # Checks of the templates (cross-field).
    "grace-too-short": ({"vllm": {"terminationGracePeriodSeconds": 40}},
                        ["vllm.terminationGracePeriodSeconds", "must be larger than"]),
    "duplicate-consumer": ({"consumers": [QDRANT, QDRANT]}, ["consumers[1].name", "used twice"]),
    # Names past 63 characters were cut, and two cut alike were one object (helm template passed).
    "consumer-names-cut-alike": ({"consumers": [
        {**QDRANT, "name": "pgvector-embeddings-production-a" + "x" * 20},
        {**QDRANT, "name": "pgvector-embeddings-production-b" + "x" * 20}]},
        ["consumers[0].name", "more than the 63 a Kubernetes name may hold"]),
    "fullname-too-long": ({"fullnameOverride": "embeddings-pipeline-production-eu-west-1-cluster-01"},
                          ["release name", "-vllm-metrics", "at most 50 characters"]),
    "lancedb-two-replicas": ({"consumers": [{"name": "l", "replicas": 2, "sink": {
        "type": "lancedb", "uri": "lancedb:///data/lancedb/t"}}]}, ["consumers[0] (l)", "1 replica"]),
    "lancedb-off-volume": ({"consumers": [{"name": "l", "sink": {
        "type": "lancedb", "uri": "lancedb:///elsewhere/t"}}]}, ["consumers[0].sink.uri", "mountPath"]),
    "irsa-without-serviceaccount": ({"serviceAccount": {"vllm": {"create": False}}, "objectStore": {"credentials": {
        "source": "irsa", "irsaRoleArn": "arn:aws:iam::123456789012:role/r"}}}, ["serviceAccount.vllm.create"]),
    "irsa-without-consumer-serviceaccount": (
        {"serviceAccount": {"consumer": {"create": False}}, "consumers": [QDRANT],
         "objectStore": {"credentials": {"source": "irsa", "irsaRoleArn": "arn:aws:iam::123456789012:role/r"}}},
        ["serviceAccount.consumer.create"]),
    # Least privilege.
    "one-shared-serviceaccount": ({"serviceAccount": {"create": True}},
                                  ["/serviceAccount", "additional properties 'create' not allowed"]),
    "sa-annotation-not-string": ({"serviceAccount": {"consumer": {"annotations": {"a": 1}}}},
                                 ["/serviceAccount/consumer/annotations/a", "want string"]),
    **{f"inline-kafka-{setting}": ({"kafka": {"config": {setting: "hunter2"}}},
                                   [f"/kafka/config/{setting}", "Secret reference", "VLLM_MM_EVENTS_KAFKA__<SETTING>"])
       for setting in ("ssl.key.pem", "ssl.keystore.password", "ssl.key.password", "sasl.oauthbearer.client.secret",
                       "sasl.username", "SASL.PASSWORD")},
    "inline-registry-token": ({"kafka": {"schemaRegistry": {"config": {"bearer.auth.token": "t"}}}},
                              ["/kafka/schemaRegistry/config/bearer.auth.token", "Secret reference"]),
    "kafka-config-overrides-protocol": ({"kafka": {"securityProtocol": "SSL", "config": {
        "security.protocol": "PLAINTEXT"}}}, ["/kafka/config/security.protocol", "kafka.securityProtocol"]),
    "api-key-flag": ({"vllm": {"extraArgs": ["--max-model-len", "8192", "--api-key", "k"]}},
                     ["/vllm/extraArgs/2", "vllm.apiKey"]),
    "api-key-flag-equals": ({"vllm": {"extraArgs": ["--api-key=k"]}}, ["/vllm/extraArgs/0", "vllm.apiKey"]),
    "api-key-literal-env": ({"vllm": {"extraEnv": [{"name": "VLLM_API_KEY", "value": "k"}]}},
                            ["/vllm/extraEnv/0/value", "valueFrom.secretKeyRef"]),
    "kafka-secret-literal-env": ({"consumers": [{**QDRANT, "extraEnv": [
        {"name": "VLLM_MM_EVENTS_KAFKA__SSL_KEY_PEM", "value": "-----BEGIN PRIVATE KEY-----"}]}]},
        ["/consumers/0/extraEnv/0/value", "valueFrom.secretKeyRef"]),
    "shared-consumer-literal-env": ({"consumer": {"extraEnv": [{"name": "PGPASSWORD", "value": "p"}]}},
                                    ["/consumer/extraEnv/0/value", "valueFrom.secretKeyRef"]),
    # The whole-JSON forms of the Kafka and registry settings (the README's way to pass SASL secrets).
    "kafka-json-literal-env": ({"vllm": {"extraEnv": [{"name": "VLLM_MM_EVENTS_KAFKA",
                                                       "value": '{"sasl.password":"hunter2"}'}]}},
                               ["/vllm/extraEnv/0/value", "valueFrom.secretKeyRef"]),
    "registry-json-literal-env": ({"consumer": {"extraEnv": [{"name": "VLLM_MM_EVENTS_SCHEMA_REGISTRY",
                                                              "value": '{"basic.auth.user.info":"u:p"}'}]}},
                                  ["/consumer/extraEnv/0/value", "valueFrom.secretKeyRef"]),
    "endpoint-with-credentials-env": ({"vllm": {"extraEnv": [{"name": "AWS_ENDPOINT_URL",
                                                              "value": "http://AKIA:SECRET@minio:9000"}]}},
                                      ["/vllm/extraEnv/0/value", "no user:password@"]),
    "registry-url-with-credentials-env": ({"consumer": {"extraEnv": [{"name": "VLLM_MM_EVENTS_SCHEMA_REGISTRY_URL",
                                                                      "value": "https://u:p/w@registry:8081"}]}},
                                          ["/consumer/extraEnv/0/value", "no user:password@"]),
    "api-key-without-key": ({"vllm": {"apiKey": {"secretName": "s", "secretKey": ""}}}, ["/vllm/apiKey/secretKey"]),
    "qdrant-https-string": ({"consumers": [{**QDRANT, "sink": {**QDRANT["sink"], "https": "yes"}}]},
                            ["/consumers/0/sink/https", "want boolean"]),
    "pg-unknown-sslmode": ({"consumers": [{"name": "p", "sink": {
        "type": "pgvector", "uri": "pgvector://u@pg:5432/db/t", "sslMode": "strict"}}]},
        ["/consumers/0/sink/sslMode", "'verify-full'"]),
    "pg-verify-full-without-ca": ({"consumers": [{"name": "p", "sink": {
        "type": "pgvector", "uri": "pgvector://u@pg:5432/db/t", "sslMode": "verify-full"}}]},
        ["/consumers/0/sink", "missing property 'sslRootCert'"]),
    "pg-verify-ca-empty-ca": ({"consumers": [{"name": "p", "sink": {
        "type": "pgvector", "uri": "pgvector://u@pg:5432/db/t", "sslMode": "verify-ca",
        "sslRootCert": {"secretName": "", "secretKey": "ca.crt"}}}]}, ["/consumers/0/sink/sslRootCert/secretName"]),
    "pg-tls-on-qdrant": ({"consumers": [{**QDRANT, "sink": {**QDRANT["sink"], "sslMode": "require"}}]},
                         ["/consumers/0/sink", "additional properties 'sslMode'"]),
    "netpol-bad-peer": ({"networkPolicy": {"kafka": {"to": [{"ipblock": {"cidr": "10.0.0.0/8"}}]}}},
                        ["/networkPolicy/kafka/to/0", "additional properties 'ipblock'"]),
    "netpol-port-without-port": ({"networkPolicy": {"objectStore": {"ports": [{"protocol": "TCP"}]}}},
                                 ["/networkPolicy/objectStore/ports/0", "missing property 'port'"]),
    "netpol-dns-without-ports": ({"networkPolicy": {"dns": {"ports": []}}}, ["/networkPolicy/dns/ports"]),
    "netpol-enabled-string": ({"networkPolicy": {"enabled": "yes"}}, ["/networkPolicy/enabled", "want boolean"]),
    # Grafana dashboards.
    "dashboards-enabled-string": ({"metrics": {"grafanaDashboards": {"enabled": "yes"}}},
                                  ["/metrics/grafanaDashboards/enabled", "want boolean"]),
    "dashboards-label-not-string": ({"metrics": {"grafanaDashboards": {"labels": {"grafana_dashboard": 1}}}},
                                    ["/metrics/grafanaDashboards/labels/grafana_dashboard", "want string"]),
    "dashboards-bad-namespace": ({"metrics": {"grafanaDashboards": {"namespace": "Monitoring"}}},
                                 ["/metrics/grafanaDashboards/namespace"]),
    "dashboards-typo": ({"metrics": {"grafanaDashboards": {"enable": True}}},
                        ["/metrics/grafanaDashboards", "additional properties 'enable'"]),
    # The publisher's outbox and metrics port.
    "metrics-port-negative": ({"publisher": {"metricsPort": -1}}, ["/publisher/metricsPort", "minimum"]),
    # The publisher's own ceilings (publisher/config.py), refused at template time, not at the pod's start.
    "upload-threads-too-many": ({"publisher": {"uploadThreads": 1000}}, ["/publisher/uploadThreads", "maximum"]),
    "shutdown-timeout-too-long": ({"publisher": {"shutdownTimeoutS": 1e9}}, ["/publisher/shutdownTimeoutS", "maximum"]),
    "metrics-port-too-large": ({"publisher": {"metricsPort": 70000}}, ["/publisher/metricsPort", "maximum"]),
    "metrics-port-string": ({"publisher": {"metricsPort": "9401"}}, ["/publisher/metricsPort", "want integer"]),
    "metrics-port-is-api-port": ({"publisher": {"metricsPort": 8000}}, ["publisher.metricsPort", "vllm.port"]),
    "metrics-from-bad-peer": ({"networkPolicy": {"vllm": {"metricsFrom": [{"pods": {}}]}}},
                              ["/networkPolicy/vllm/metricsFrom/0", "additional properties 'pods'"]),
    "spool-max-below-1mib": ({"publisher": {"spool": {"maxBytes": 1000}}}, ["/publisher/spool/maxBytes", "minimum"]),
    "spool-max-string": ({"publisher": {"spool": {"maxBytes": "1Gi"}}}, ["/publisher/spool/maxBytes", "want integer"]),
    "spool-relative-path": ({"publisher": {"spool": {"mountPath": "spool"}}}, ["/publisher/spool/mountPath"]),
    "spool-root-path": ({"publisher": {"spool": {"mountPath": "/"}}}, ["/publisher/spool/mountPath"]),
    "spool-unknown-volume": ({"publisher": {"spool": {"volume": "hostPath"}}},
                             ["/publisher/spool/volume", "'emptyDir', 'persistentVolumeClaim'"]),
    "spool-bad-size": ({"publisher": {"spool": {"emptyDir": {"sizeLimit": "lots"}}}},
                       ["/publisher/spool/emptyDir/sizeLimit"]),
    "spool-bad-access-mode": ({"publisher": {"spool": {"persistentVolumeClaim": {"accessModes": ["ReadOnlyMany"]}}}},
                              ["/publisher/spool/persistentVolumeClaim/accessModes/0"]),
    "spool-typo": ({"publisher": {"spool": {"maxbytes": 1 << 30}}},
                   ["/publisher/spool", "additional properties 'maxbytes'"]),
    "spool-on-tmp": ({"publisher": {"spool": {"mountPath": "/tmp"}}},
                     ["publisher.spool.mountPath", "already a mount"]),
    "spool-emptydir-not-above-max": (
        {"publisher": {"spool": {"emptyDir": {"sizeLimit": "1Gi"}}}},
        ["publisher.spool.emptyDir.sizeLimit", "must be larger than publisher.spool.maxBytes"]),
    "spool-emptydir-below-max": ({"publisher": {"spool": {"maxBytes": 4 << 30, "emptyDir": {"sizeLimit": "3Gi"}}}},
                                 ["publisher.spool.emptyDir.sizeLimit", "(4294967296)"]),
    "spool-rwo-claim-two-replicas": ({"vllm": {"replicaCount": 2}, "publisher": {"spool": {
        "volume": "persistentVolumeClaim"}}}, ["publisher.spool.persistentVolumeClaim.accessModes", "ReadWriteMany"]),
    "spool-claim-too-small": ({"publisher": {"spool": {"volume": "persistentVolumeClaim", "persistentVolumeClaim": {
        "size": "1Gi"}}}}, ["publisher.spool.persistentVolumeClaim.size", "must hold 1 engine slot"]),
    "spool-shared-claim-too-small": ({"vllm": {"replicaCount": 3}, "publisher": {"spool": {
        "volume": "persistentVolumeClaim", "persistentVolumeClaim": {"accessModes": ["ReadWriteMany"],
                                                                     "size": "2Gi"}}}},
                                     ["publisher.spool.persistentVolumeClaim.size", "must hold 3 engine slot(s)"]),
}


@pytest.mark.parametrize("case", REJECTED)
def test_bad_values_are_rejected_with_a_clear_message(case, tmp_path):
    values, expected = REJECTED[case]
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    res = run_helm("template", RELEASE, str(CHART), "-f", str(f))
    assert res.returncode != 0, f"{case} was accepted"
    for text in expected:
        assert text in res.stderr, f"{case}: {text!r} not in:\n{res.stderr}"


def test_replicas_string_from_the_command_line():
    res = run_helm("template", RELEASE, str(CHART), "--set", "consumers[0].name=q",
                   "--set", "consumers[0].sink.type=qdrant", "--set", "consumers[0].sink.uri=qdrant://q:6333/c",
                   "--set", "consumers[0].replicas=abc")
    assert res.returncode != 0
    assert "at '/consumers/0/replicas': got string, want integer" in res.stderr, res.stderr
