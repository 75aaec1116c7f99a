"""What the publisher's fault tests share: a publisher config on the real OpenAI server, a chat with a
distinct image, the exact-count check of a topic against the requests that returned, a scrape of the
publisher's /metrics, and the server's sidecars (found by an environment tag: they detach from its
process tree, and other engines may run on the machine)."""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Callable
from urllib.parse import unquote, urlsplit

import requests

from openai_server import OpenAIServer, image_part
from pipeline import consume, read_topic
from services import free_port

MESSAGE_TIMEOUT_MS = 3000
TEXT = {"type": "text", "text": "what is in this image ?"}
TAG = "MM_TEST_TAG"  # env var marking a server's processes, sidecars included: OpenAIServer(env={TAG: ...})


def publisher_config(tmp_path, kafka, topic) -> dict:
    return {"object_store": (tmp_path / "objects").as_uri(), "event_sink": f"kafka://{kafka.bootstrap}/{topic}",
            "topic_partitions": 1, "spool_dir": str(tmp_path / "spool"), "durability_timeout_s": 10,
            "kafka": {"message.timeout.ms": MESSAGE_TIMEOUT_MS, "reconnect.backoff.max.ms": 500},
            "metrics_port": free_port(), "metrics_host": "127.0.0.1"}


def scrape(config: dict) -> dict[str, float]:
    """The publisher's /metrics, as {sample name: value} (label-free samples; histogram buckets by le)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{config['metrics_port']}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            le = sample.labels.get("le")
            out[sample.name + (f"{{le={le}}}" if le else "")] = sample.value
    return out


def chat(s, seed) -> str:
    from publisher.vllm.demo.tiny_llava import random_image

    r = s.chat([image_part(random_image(seed)), TEXT])
    assert r.status_code == 200, r.text
    return r.json()["id"]


def read_local(uri: str) -> bytes:
    return open(unquote(urlsplit(uri).path), "rb").read()


def summary(kafka, topic, returned: list[str], allow_missing: bool = False,
            read: Callable[[str], bytes] = read_local, decode: Callable[[bytes], dict] | None = None) -> str:
    """Read the topic from the beginning and check exact counts against the requests that returned;
    ``read`` an object's bytes by URI, ``decode`` a value (default: the codec without a registry)."""
    if decode is None:
        events = [e for e, _ in consume(kafka.bootstrap, topic, expected=len(returned), timeout=120)]
    else:
        events = [decode(m.value()) for m in read_topic(kafka.bootstrap, topic, len(returned), timeout=120)]
    ids = [e["request_id"] for e in events]
    lost = set(returned) - set(ids)
    by_id: dict[str, set] = {}
    for e in events:
        by_id.setdefault(e["request_id"], set()).add(e["event_id"])
    bad = 0
    for e in events:
        for item in e["embeddings"]:
            data = read(item["uri"])
            bad += hashlib.sha256(data).hexdigest() != item["sha256"] or len(data) != item["size_bytes"]
    line = (f"returned={len(returned)} events={len(events)} lost={len(lost)} dup={len(events) - len(set(ids))} "
            f"bad_objects={bad}")
    print(line)
    assert not lost, line
    assert all(len(v) == 1 for v in by_id.values()), f"a repeat with another event_id: {by_id}"
    assert set(ids) <= set(returned) and bad == 0, line
    if not allow_missing:
        assert all(e["missing_embeddings"] == [] for e in events), line
    return line


def sidecars(tag: str, role: str = "") -> list:
    """This server's publisher sidecars (they detach from its process tree; found by an env tag)."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        try:
            if "publisher.sidecar.process" in cmd and f" {role}" in cmd and p.environ().get(TAG) == tag:
                out.append(p)
        except psutil.Error:
            pass
    return out


def kill_pod(s: OpenAIServer, tag: str) -> None:
    """As when a node dies: the server's process group and its publisher sidecars, SIGKILL."""
    import psutil

    procs = sidecars(tag)
    assert procs, "no sidecars found for this server"
    os.killpg(s.proc.pid, signal.SIGKILL)
    for p in procs:
        p.kill()
    s.proc.wait(30)
    psutil.wait_procs(procs, timeout=30)
