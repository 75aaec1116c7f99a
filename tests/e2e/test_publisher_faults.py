"""The publisher through a Kafka outage, on the real OpenAI server: the broker is killed (SIGKILL)
and stays away longer than librdkafka's message.timeout.ms, or hangs (SIGSTOP); the engine keeps
serving; once the broker is back, every returned request has exactly its event (a repeat may only
repeat the same event_id), and every object an event names exists with the event's checksum.

The broker is the session's: it is always running and healthy again when a test ends.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid
from urllib.parse import unquote, urlsplit

import pytest

from openai_server import OpenAIServer, image_part
from pipeline import consume

pytestmark = pytest.mark.e2e
MESSAGE_TIMEOUT_MS = 3000
TEXT = {"type": "text", "text": "what is in this image ?"}


def publisher_config(tmp_path, kafka, topic) -> dict:
    return {"object_store": (tmp_path / "objects").as_uri(), "event_sink": f"kafka://{kafka.bootstrap}/{topic}",
            "topic_partitions": 1, "spool_dir": str(tmp_path / "spool"), "durability_timeout_s": 10,
            "kafka": {"message.timeout.ms": MESSAGE_TIMEOUT_MS, "reconnect.backoff.max.ms": 500}}


@pytest.fixture
def server(tmp_path, tiny_llava, kafka):
    topic = f"faults.{uuid.uuid4().hex[:6]}"
    s = OpenAIServer(tiny_llava, publisher_config(tmp_path, kafka, topic), tmp_path).wait_ready()
    yield s, topic
    s.stop()


def summary(kafka, topic, returned: list[str], allow_missing: bool = False) -> str:
    events = [e for e, _ in consume(kafka.bootstrap, topic, expected=len(returned), timeout=120)]
    ids = [e["request_id"] for e in events]
    lost = set(returned) - set(ids)
    by_id: dict[str, set] = {}
    for e in events:
        by_id.setdefault(e["request_id"], set()).add(e["event_id"])
    bad = 0
    for e in events:
        for item in e["embeddings"]:
            data = open(unquote(urlsplit(item["uri"]).path), "rb").read()
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


def chat(s, seed) -> str:
    from publisher.vllm.demo.tiny_llava import random_image

    r = s.chat([image_part(random_image(seed)), TEXT])
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_broker_killed_longer_than_the_message_timeout(server, kafka):
    s, topic = server
    returned = [chat(s, 300), chat(s, 301)]
    kafka.kill()
    try:
        t0 = time.monotonic()
        returned += [chat(s, seed) for seed in range(302, 306)]  # the engine keeps serving
        time.sleep(max(0.0, 3 * MESSAGE_TIMEOUT_MS / 1000 - (time.monotonic() - t0)))  # every send times out
    finally:
        kafka.restart()
    returned.append(chat(s, 306))
    summary(kafka, topic, returned)
    log = s.stop()
    assert "producing it again" in log and "'failed': 0" in log, log[-3000:]


def test_broker_hangs_then_continues(server, kafka):
    s, topic = server
    returned = [chat(s, 310)]
    kafka.pause()
    try:
        returned += [chat(s, seed) for seed in range(311, 315)]
        time.sleep(2 * MESSAGE_TIMEOUT_MS / 1000)
    finally:
        kafka.resume()
    returned.append(chat(s, 315))
    summary(kafka, topic, returned)
    assert "'failed': 0" in s.stop()


def kill_pod(s: OpenAIServer) -> None:
    """As when a node dies: the server's process group and the publisher's sidecars, SIGKILL."""
    import psutil

    sidecars = [p for p in psutil.process_iter(["cmdline"])
                if "publisher.sidecar.process" in " ".join(p.info["cmdline"] or [])]
    os.killpg(s.proc.pid, signal.SIGKILL)
    for p in sidecars:
        p.kill()
    s.proc.wait(30)
    psutil.wait_procs(sidecars, timeout=30)


def test_engine_and_sidecars_killed_then_restarted_on_the_same_spool(tmp_path, tiny_llava, kafka):
    """Requests return while the broker hangs; then the whole pod is killed. A new engine on the same
    spool_dir publishes every returned request's event (objects not stored by then would be listed
    missing, never named)."""
    topic = f"faults.{uuid.uuid4().hex[:6]}"
    config = publisher_config(tmp_path, kafka, topic)
    first = OpenAIServer(tiny_llava, config, tmp_path / "first").wait_ready()
    try:
        returned = [chat(first, 320)]
        kafka.pause()
        try:
            returned += [chat(first, seed) for seed in (321, 322, 323)]
            time.sleep(1.0)  # the responses are out; the sidecar's spool fsync follows within a pump
            kill_pod(first)
        finally:
            kafka.resume()
    finally:
        if first.proc.poll() is None:
            first.stop()
    second = OpenAIServer(tiny_llava, config, tmp_path / "second").wait_ready()
    try:
        summary(kafka, topic, returned, allow_missing=True)
    finally:
        log = second.stop()
    assert "replaying" in log and "'replayed': " in log, log[-3000:]
