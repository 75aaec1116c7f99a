"""Helpers for end-to-end tests: run the engine driver, read events back as a consumer would, and the
engine events the consumer tests share (``publish_consumer_events``: tests/e2e/conftest.py ``published``)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fastavro

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "schemas" / "mm_embedding_event.avsc"
DRIVER = REPO / "tests" / "e2e" / "engine_driver.py"


def reader_schema():
    """Straight from the repo's .avsc, as an outside consumer would."""
    return fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))


def decode_value(data: bytes) -> dict:
    """Avro single-object encoding: 0xC3 0x01, 8-byte fingerprint, body."""
    assert data[:2] == b"\xc3\x01", data[:2]
    fp = bytes.fromhex(fastavro.schema.fingerprint(
        fastavro.schema.to_parsing_canonical_form(reader_schema()), "CRC-64-AVRO"))
    assert data[2:10] == fp, "fingerprint does not match the repo's schema"
    return fastavro.schemaless_reader(io.BytesIO(data[10:]), reader_schema())


def run_driver(spec: dict, workdir: Path, env: dict | None = None, timeout: float = 600) -> tuple[list, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, out=str(workdir / "out"))
    spec_file = workdir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, str(DRIVER), str(spec_file)], env=full_env, capture_output=True,
                       text=True, timeout=timeout)
    log = p.stdout + p.stderr
    (workdir / "driver.log").write_text(log)
    if p.returncode != 0:
        raise AssertionError(f"engine driver failed ({p.returncode}):\n{log[-6000:]}")
    return json.loads((workdir / "out" / "results.json").read_text()), log


def consume(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[tuple[dict, object]]:
    """Read the topic's events from the beginning until ``expected`` arrived (and a little longer)."""
    return [(decode_value(m.value()), m) for m in read_topic(bootstrap, topic, expected, timeout)]


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list:
    """The topic's raw records from the beginning, until ``expected`` arrived (and 2 s longer)."""
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + timeout
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                out.append(m)
                continue
            if len(out) >= expected:
                quiet_until = quiet_until or time.monotonic() + 2  # catch any extra, unexpected record
                if time.monotonic() > quiet_until:
                    break
    finally:
        c.close()
    return out


def read_event_log(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(fastavro.reader(f, reader_schema=reader_schema()))


def stats_line(log: str, side: str) -> str:
    """The publisher's shutdown report: from the engine, or from the sidecar when vLLM killed
    the engine before the connector's shutdown ran."""
    lines = [ln for ln in log.splitlines()
             if f"mm-events {side} side stopped" in ln or f"mm-events {side} sidecar stopped" in ln]
    assert lines, f"no shutdown report from the {side} side in the engine log"
    return lines[-1]


# ---- the engine events the consumer end-to-end tests share ----------------------------------------------
# 8 requests, 9 media items: distinct images, one request with two, image 20 seen twice.
CONSUMER_BATCHES = [[{"images": [s], "extra_args": {"tenant": "acme" if s % 2 else "globex"}} for s in range(20, 27)]
                    + [{"images": [27, 20], "extra_args": {"tenant": "initech"}}]]
N_EVENTS, N_POINTS = 8, 9
PARTITIONS = 3


def publish_consumer_events(workdir: Path, tiny_llava, kafka, minio) -> dict:
    """The engine on CONSUMER_BATCHES with the publisher: objects in a fresh MinIO bucket, events in a fresh
    3-partition topic (tests read it with their own groups, never write to it). Returns the topic, the bucket,
    the driver's results and the events read back: decoded ``events``, raw ``values`` and ``keys``, and each
    record's (partition, offset) in ``positions``."""
    bucket = minio.create_bucket(f"cons-{uuid.uuid4().hex[:8]}")
    topic = f"vllm.mm-embeddings.{uuid.uuid4().hex[:6]}"
    extra = {"object_store": f"s3://{bucket}/emb", "s3_endpoint_url": minio.endpoint,
             "event_sink": f"kafka://{kafka.bootstrap}/{topic}", "topic_partitions": PARTITIONS}
    env = {k: v for k, v in minio.env.items() if k != "AWS_ENDPOINT_URL"}
    results, _log = run_driver({"model": str(tiny_llava), "extra_config": extra, "batches": CONSUMER_BATCHES},
                               workdir, env=env)
    events = consume(kafka.bootstrap, topic, expected=N_EVENTS)
    assert len(events) == N_EVENTS
    return {"topic": topic, "bucket": bucket, "results": results, "events": [e for e, _ in events],
            "values": [m.value() for _, m in events], "keys": [m.key() for _, m in events],
            "positions": [(m.partition(), m.offset()) for _, m in events]}


def source(kafka, topic: str) -> str:
    return f"kafka://{kafka.bootstrap}/{topic}"


def all_ids(events) -> set[str]:
    """One point id per (event, item): what a sink holds, once each, after indexing ``events``."""
    from consumers.vectors import point_id

    return {point_id(e["event_id"], i["item_index"]) for e in events for i in e["embeddings"]}
