"""Mixed schema versions on one Kafka topic and in one event log, read by today's consumer path.

The publisher's real sinks write (``open_event_sink``: ``KafkaSink``, ``AvroFileSink``), each with the codec
of one schema version; the consumer's real path reads (``open_source`` read-only + ``EventDecoder`` +
``read_events``, as ``vllm-mm-events events`` and ``consume`` decode). No registry here: values are
single-object encoded (tests/backends/test_schema_registry.py has the Confluent framing).

Versions: ``v1`` is the first released schema (schemas/history/v1.avsc; the current one, v2, adds two item fields);
``next`` (tests/unit/test_schema_compat.py: the current schema plus optional fields with defaults) stands
for the following release, so both directions are exercised on a real difference:

- backward, a newer reader: a consumer on ``next`` (which knows v1 by fingerprint) reads v1 events;
- forward, an older reader: today's consumer (the current schema) reads ``next`` events where the writer schema
  travels with them (the event log's header, or a registry id); on Kafka without a registry it cannot
  (the fingerprint names a schema it has never seen) and dead-letters them as ``unknown_schema``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from unit.test_schema_compat import next_schema, with_next_fields

from consumers.decoder import EventDecoder
from consumers.events import read_events
from consumers.sources import open_source
from publisher.event_sinks import open_event_sink
from publisher.stores.local import LocalDirStore
from schemas import event_schema, released_schemas
from schemas.codec import AvroCodec

import synth

V1 = dict(released_schemas())["v1"]


@pytest.fixture
def events(tmp_path):
    """make(tag, i): an event with one stored embedding (so the nested new field is exercised too)."""
    store = LocalDirStore(tmp_path / "objects")

    def make(tag: str, i: int) -> dict:
        return synth.make_event(store, "p", f"{tag}-{i}", [synth.features(i, n=2, dim=8)], {"writer": tag})[0]
    return make


def _publish(uri: str, codec: AvroCodec, records: list[dict], **kw) -> None:
    sink = open_event_sink(uri, codec, **kw)
    done: list = []
    for r in records:
        sink.publish(r, done.append)
    assert sink.flush(30) == 0 and done == [None] * len(records)
    sink.close()


def _read(uri: str, decoder: EventDecoder, reader_schema: dict) -> tuple[list[dict], list[str]]:
    """Today's consumer path, read-only, from the beginning: (events, warnings about skipped records)."""
    warnings: list[str] = []
    source = open_source(uri, f"g-{uuid.uuid4().hex[:8]}", kafka={}, checkpoint=None, reader_schema=reader_schema,
                         read_only=True)
    try:
        return list(read_events(source, decoder, follow=False, warn=warnings.append)), warnings
    finally:
        source.close()


def _next_decoder() -> EventDecoder:
    """The next release's consumer: reads into ``next``, knows every released version by fingerprint."""
    decoder = EventDecoder()
    decoder.codec = AvroCodec(next_schema(), writers=[s for _, s in released_schemas()])
    return decoder


def test_one_topic_v1_current_and_next_writers(kafka, events):
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    uri = f"kafka://{kafka.bootstrap}/{topic}"
    v1 = [events("v1", i) for i in range(3)]
    current = [events("current", i) for i in range(3)]
    nxt = [with_next_fields(events("next", i), i) for i in range(3)]
    _publish(uri, AvroCodec(V1, writers=[]), v1, topic_partitions=1)  # a publisher of the released version
    _publish(uri, AvroCodec(), current)  # today's publisher
    _publish(uri, AvroCodec(next_schema(), writers=[]), nxt)  # a publisher of the next version

    # Today's consumer: v1 and current events (it knows v1's fingerprint); next's is unknown to it.
    got, warnings = _read(uri, EventDecoder(), event_schema())
    assert [e["request_id"] for e in got] == [e["request_id"] for e in v1 + current]
    assert all("priority" not in e for e in got)
    assert len(warnings) == 3 and all("unknown_schema" in w and "unknown schema fingerprint" in w for w in warnings)

    # The next release's consumer: every event; v1's and current's read with the new fields' defaults.
    got, warnings = _read(uri, _next_decoder(), next_schema())
    assert warnings == []
    assert [e["request_id"] for e in got] == [e["request_id"] for e in v1 + current + nxt]
    assert [e["priority"] for e in got] == [None] * 6 + ["p0", "p1", "p2"]
    assert [e["embeddings"][0]["encoder_ms"] for e in got] == [None] * 6 + [1.5, 2.5, 3.5]
    assert {e["embeddings"][0]["uri"] for e in got} == {e["embeddings"][0]["uri"] for e in v1 + current + nxt}


def test_one_event_log_started_by_an_older_publisher(tmp_path, events):
    """A log keeps its first writer's schema (the Avro container header), so a publisher of a later release
    moves a log of an earlier one aside (``events.avro.<UTC time>``) and starts a new one: none of its fields
    is dropped. A reader from the beginning reads the moved log, then the new one. (A publisher that does not
    know the log's schema, here the next release's built without the history, appends in the log's schema:
    its new fields are dropped until a release that knows it moves the log aside.)"""
    log = tmp_path / "events.avro"
    v1, current = [events("v1", i) for i in range(2)], [events("current", i) for i in range(2)]
    nxt = [with_next_fields(events("next", i), i) for i in range(2)]
    _publish(log.as_uri(), AvroCodec(V1, writers=[]), v1)
    _publish(log.as_uri(), AvroCodec(), current)
    _publish(log.as_uri(), AvroCodec(next_schema(), writers=[]), nxt)

    got, warnings = _read(log.as_uri(), EventDecoder(), event_schema())  # today's consumer
    assert warnings == [] and [e["request_id"] for e in got] == [e["request_id"] for e in v1 + current + nxt]
    got, warnings = _read(log.as_uri(), _next_decoder(), next_schema())  # the next release's consumer
    assert warnings == [] and [e["request_id"] for e in got] == [e["request_id"] for e in v1 + current + nxt]
    assert [e["priority"] for e in got] == [None] * 6  # written in the log's schema (today's): dropped
    assert _header_schema_fields(log) == [f["name"] for f in event_schema()["fields"]]
    (moved,) = tmp_path.glob("events.avro.2*")
    assert _header_schema_fields(moved) == [f["name"] for f in V1["fields"]]


def test_one_event_log_started_by_a_newer_publisher(tmp_path, events):
    """A log started by the next version: today's consumer (the current schema) reads every event through the
    writer schema in the log's header (forward); an older publisher appending to it gets the new fields'
    defaults written for it."""
    log = tmp_path / "events.avro"
    nxt = [with_next_fields(events("next", i), i) for i in range(2)]
    v1, current = [events("v1", i) for i in range(2)], [events("current", i) for i in range(2)]
    _publish(log.as_uri(), AvroCodec(next_schema(), writers=[]), nxt)
    _publish(log.as_uri(), AvroCodec(V1, writers=[]), v1)
    _publish(log.as_uri(), AvroCodec(), current)

    got, warnings = _read(log.as_uri(), EventDecoder(), event_schema())  # today's reader
    assert warnings == [] and [e["request_id"] for e in got] == [e["request_id"] for e in nxt + v1 + current]
    assert all("priority" not in e and "encoder_ms" not in e["embeddings"][0] for e in got)
    got, warnings = _read(log.as_uri(), _next_decoder(), next_schema())
    assert warnings == [] and [e["priority"] for e in got] == ["p0", "p1", None, None, None, None]
    assert [e["embeddings"][0]["encoder_ms"] for e in got] == [1.5, 2.5, None, None, None, None]
    assert _header_schema_fields(log) == [f["name"] for f in next_schema()["fields"]]


def _header_schema_fields(log: Path) -> list[str]:
    import fastavro

    with open(log, "rb") as f:
        return [f["name"] for f in fastavro.reader(f).writer_schema["fields"]]
