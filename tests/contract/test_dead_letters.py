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
             "source": x["source"], "group": x["consumer_group"],
             "key": None if x["key_b64"] is None else base64.b64decode(x["key_b64"]),
             "header_list": [(k, None if v is None else base64.b64decode(v)) for k, v in x["headers"]],
             "headers": {k: base64.b64decode(v).decode(errors="replace") for k, v in x["headers"] if v is not None}}
            for x in lines]


def read_dlq_topic(bootstrap, topic, n):
    out = []
    for m in read_topic(bootstrap, topic, n):
        h = {k: v.decode(errors="replace") for k, v in m.headers() or [] if v is not None}
        out.append({"value": m.value(), "key": m.key(), "reason": h["dlq.reason"], "error": h["dlq.error"],
                    "header_list": [(k, v) for k, v in m.headers() or [] if not k.startswith("dlq.")],
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
    assert got[0]["key"] == b"req-1" and got[1]["key"] is None


def test_keys_and_headers_are_kept_byte_for_byte_in_order(dlq):
    """The file queue dropped the key, kept headers as a dict (a repeated name lost all but one value)
    and decoded their bytes as text (an invalid byte became U+FFFD)."""
    dead_letters, read = dlq
    headers = [("h", b"1"), ("h", b"\xff\x00two"), ("empty", None)]
    with dead_letters:
        dead_letters.send(b"v", b"\xfekey", headers, "undecodable", "e", COORDS)
        dead_letters.flush()
        (got,) = read(1)
    assert got["key"] == b"\xfekey" and got["header_list"][:3] == headers
