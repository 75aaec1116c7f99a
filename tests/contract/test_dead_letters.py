"""One contract, every dead-letter queue: a JSON-lines file and a Kafka topic (a real Apache Kafka broker).

A poison record keeps its bytes, key and headers, and gains why (reason, error) and where it
came from; after ``flush`` it is durable, read back by an independent reader.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from consumers.dead_letters import open_dead_letters

from pipeline import read_topic

COORDS = {"topic": "events", "partition": "2", "offset": "41"}


def read_file(path, n):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [{"value": base64.b64decode(x["value_b64"]), "reason": x["reason"], "error": x["error"],
             "source": x["source"], "group": x["consumer_group"], "headers": x["headers"]} for x in lines]


def read_dlq_topic(bootstrap, topic, n):
    out = []
    for m in read_topic(bootstrap, topic, n):
        h = {k: v.decode() for k, v in m.headers() or []}
        out.append({"value": m.value(), "key": m.key(), "reason": h["dlq.reason"], "error": h["dlq.error"],
                    "source": {k[len("dlq.source."):]: v for k, v in h.items() if k.startswith("dlq.source.")},
                    "group": h["dlq.consumer.group"], "headers": h})
    return out


@pytest.fixture(params=["file", "kafka"])
def dlq(request, tmp_path):
    """(dead letters, read(n) -> records as an independent reader sees them)."""
    if request.param == "file":
        path = tmp_path / "events.avro.dlq.jsonl"
        yield open_dead_letters(None, (tmp_path / "events.avro").as_uri(), "grp", {}), lambda n: read_file(path, n)
    else:
        kafka = request.getfixturevalue("kafka")
        source = f"kafka://{kafka.bootstrap}/dlq-contract-{uuid.uuid4().hex[:8]}"
        topic = source.rsplit("/", 1)[1] + ".dlq"  # the default: <topic>.dlq on the source's brokers
        yield open_dead_letters(None, source, "grp", {}), lambda n: read_dlq_topic(kafka.bootstrap, topic, n)


def test_poison_is_kept_with_reason_error_and_coordinates(dlq):
    dead_letters, read = dlq
    with dead_letters:
        dead_letters.send(b"\x00bad", b"req-1", [("ce_id", b"e-1")], "undecodable", "not Avro", COORDS)
        dead_letters.send(b"\xc3\x01more", None, [], "missing_object", "s3://b/k: no such object", COORDS)
        dead_letters.flush()
        # A Kafka DLQ keys by the record's key: the two may land on different partitions, in any order.
        got = sorted(read(2), key=lambda g: g["value"])
    assert [g["value"] for g in got] == [b"\x00bad", b"\xc3\x01more"]
    assert [g["reason"] for g in got] == ["undecodable", "missing_object"]
    assert got[1]["error"] == "s3://b/k: no such object"
    assert all(g["source"] == COORDS and g["group"] == "grp" for g in got)
    assert got[0]["headers"]["ce_id"] == "e-1"  # the original headers travel with the record
    if "key" in got[0]:
        assert got[0]["key"] == b"req-1"
