"""The publisher through a Kafka outage, on the real OpenAI server: the broker is killed (SIGKILL)
and stays away longer than librdkafka's message.timeout.ms, or hangs (SIGSTOP); the engine keeps
serving; once the broker is back, every returned request has exactly its event (a repeat may only
repeat the same event_id), and every object an event names exists with the event's checksum.

The broker is the session's: it is always running and healthy again when a test ends.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from urllib.parse import unquote, urlsplit

import pytest

from openai_server import OpenAIServer, image_part
from pipeline import consume

pytestmark = pytest.mark.e2e
MESSAGE_TIMEOUT_MS = 3000
TEXT = {"type": "text", "text": "what is in this image ?"}


@pytest.fixture
def server(tmp_path, tiny_llava, kafka):
    topic = f"faults.{uuid.uuid4().hex[:6]}"
    extra = {"object_store": (tmp_path / "objects").as_uri(), "event_sink": f"kafka://{kafka.bootstrap}/{topic}",
             "topic_partitions": 1, "spool_dir": str(tmp_path / "spool"),
             "kafka": {"message.timeout.ms": MESSAGE_TIMEOUT_MS, "reconnect.backoff.max.ms": 500}}
    s = OpenAIServer(tiny_llava, extra, tmp_path).wait_ready()
    yield s, topic
    s.stop()


def summary(kafka, topic, returned: list[str]) -> str:
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
