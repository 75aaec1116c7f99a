"""The registry path against a real Confluent-compatible Schema Registry (Apicurio, fixture ``schema_registry``)
and a real Kafka broker: the publisher's Kafka sink registers the schema under ``<topic>-value`` and writes the
Confluent wire format; the consumer's decoder resolves writer schemas by id. Each test's subject is set to
FULL compatibility through the registry's ccompat API first, as production would be.

Also: the registry's own compatibility check (FULL) on the released versions and on breaking changes, mixed
schema versions on one topic (see test_schema_versions.py for ``next``), and a registry outage while running:
the publisher keeps its registered id, the consumer its schemas by id (exact event counts).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fastavro
import pytest
from contract.test_event_sink import event
from unit.test_schema_compat import _breaking, next_schema, with_next_fields

from consumers.decoder import EventDecoder
from consumers.errors import Poison, Transient
from consumers.events import read_events
from consumers.sources import open_source
from publisher.event_sinks import open_event_sink
from schemas import compat, event_schema, released_schemas
from schemas.codec import CONTENT_TYPE_CONFLUENT, AvroCodec, registry_client, to_wire

from pipeline import read_topic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry(schema_registry):
    """The session's registry, serving again after the test, whatever the test did to it."""
    yield schema_registry
    if schema_registry.paused:
        schema_registry.resume()
    if not schema_registry.alive:
        schema_registry.restart()


@pytest.fixture
def topic(registry) -> str:
    """A fresh topic whose subject (``<topic>-value``) is set to FULL before anything registers."""
    name = f"reg-{uuid.uuid4().hex[:8]}"
    assert registry.set_compatibility(f"{name}-value", "FULL") == "FULL"
    return name


def _publish(sink, records: list[dict]) -> None:
    done: list = []
    for r in records:
        sink.publish(r, done.append)
    assert sink.flush(30) == 0 and done == [None] * len(records)


def _read(uri: str, decoder: EventDecoder) -> tuple[list[dict], list[str]]:
    warnings: list[str] = []
    source = open_source(uri, f"g-{uuid.uuid4().hex[:8]}", kafka={}, checkpoint=None, reader_schema=event_schema(),
                         read_only=True)
    try:
        return list(read_events(source, decoder, follow=False, warn=warnings.append)), warnings
    finally:
        source.close()


def _decode_retrying(decoder: EventDecoder, value: bytes, timeout: float = 30) -> dict:
    """As the consumer's writer decodes a record the registry could not resolve: retried while Transient
    (after an outage the decoder fails lookups at once for a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return decoder.decode(value)
        except Transient:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _same_schema(a: dict | str, b: dict) -> bool:
    a = json.loads(a) if isinstance(a, str) else a
    return fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(a)) == \
        fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(b))


def test_publisher_registers_under_topic_value_and_the_consumer_resolves_by_id(kafka, registry, topic):
    uri = f"kafka://{kafka.bootstrap}/{topic}"
    subject = f"{topic}-value"
    codec = AvroCodec()
    sink = open_event_sink(uri, codec, registry_url=registry.url, topic_partitions=1)
    events = [event(i) for i in range(5)]
    _publish(sink, events)
    sink.close()

    # Registered once, under <topic>-value, under FULL; the id in every value is the registry's.
    assert registry.versions(subject) == [1] and registry.compatibility(subject) == "FULL"
    latest = registry.call("GET", f"/subjects/{subject}/versions/latest")
    assert latest["id"] == codec.schema_id and _same_schema(latest["schema"], event_schema())
    assert _same_schema(registry.call("GET", f"/schemas/ids/{codec.schema_id}")["schema"], event_schema())
    raw = read_topic(kafka.bootstrap, topic, 5)
    assert len(raw) == 5
    for m in raw:
        assert m.value()[:1] == b"\x00" and struct.unpack(">I", m.value()[1:5])[0] == codec.schema_id
        assert dict(m.headers())["content-type"] == CONTENT_TYPE_CONFLUENT.encode()

    # The consumer's path: the writer schema fetched by id from the registry, once, then cached.
    decoder = EventDecoder(registry_url=registry.url)
    got, warnings = _read(uri, decoder)
    assert warnings == [] and [to_wire(e) for e in got] == events
    assert list(decoder.codec._writers) == [codec.schema_id]
    # An id the registry has never given is poison (dead-lettered), not an outage to retry.
    unknown_id = codec.schema_id + 4242
    with pytest.raises(Poison) as e:
        decoder.decode(b"\x00" + struct.pack(">I", unknown_id) + raw[0].value()[5:])
    assert e.value.kind == "unknown_schema" and str(unknown_id) in str(e.value)

    # Confluent's own deserializer reads the same bytes through the same registry.
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    deserialize = AvroDeserializer(registry_client(registry.url))
    ctx = SerializationContext(topic, MessageField.VALUE)
    assert [deserialize(m.value(), ctx)["request_id"] for m in raw] == [e["request_id"] for e in events]


def test_the_registry_accepts_the_released_versions_and_the_current_schema_under_full(registry, topic):
    subject = f"{topic}-value"
    ids = [registry.register(subject, s) for _, s in released_schemas()]  # the releases, in order
    assert registry.compatibility(subject) == "FULL" and len(registry.versions(subject)) == len(set(ids))
    assert registry.check_compatibility(subject, event_schema()) == (True, [])
    assert compat.registry_check(registry.url, subject, event_schema()) == (True, [])
    # the next version (optional fields with defaults) is accepted and registered as a new version
    assert registry.check_compatibility(subject, next_schema())[0] is True
    assert registry.register(subject, next_schema()) not in ids
    # the check's CLI asks the registry too
    r = subprocess.run([sys.executable, "-m", "schemas.compat", "--registry-url", registry.url, "--subject", subject],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and f"subject {subject}: compatible" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("change", ["renamed field", "retyped field", "new field without default",
                                    "removed field without default", "union branch added", "optional made required",
                                    "enum symbol removed, no enum default", "record renamed"])
def test_the_registry_rejects_a_breaking_change_under_full(registry, topic, change):
    subject = f"{topic}-value"
    registry.register(subject, released_schemas()[-1][1])
    candidate, field = _breaking(change)
    ok, messages = registry.check_compatibility(subject, candidate)
    assert ok is False, f"{change}: the registry accepted it under FULL"
    with pytest.raises(RuntimeError, match="HTTP 409"):  # and refuses to register it
        registry.register(subject, candidate)
    assert len(registry.versions(subject)) == 1
    # our own check agrees, and names the field
    assert any(field in p for p in compat.check_full(released_schemas()[-1][1], candidate, "v1", "candidate"))


def test_mixed_versions_on_one_topic_through_the_registry(kafka, registry, topic):
    """v1's, today's (v2) and the next version's publishers on one topic; today's consumer reads the next
    version's events by their id (forward), the next release's consumer reads v1's and v2's (backward)."""
    uri = f"kafka://{kafka.bootstrap}/{topic}"
    v1_codec, current_codec, next_codec = AvroCodec(dict(released_schemas())["v1"], writers=[]), AvroCodec(), \
        AvroCodec(next_schema(), writers=[])
    v1, current = [event(i) for i in range(3)], [event(10 + i) for i in range(3)]
    nxt = [with_next_fields(event(20 + i), i) for i in range(3)]
    for codec, records, kw in ((v1_codec, v1, {"topic_partitions": 1}), (current_codec, current, {}),
                               (next_codec, nxt, {})):
        sink = open_event_sink(uri, codec, registry_url=registry.url, **kw)
        _publish(sink, records)
        sink.close()
    assert len({v1_codec.schema_id, current_codec.schema_id, next_codec.schema_id}) == 3  # three versions
    assert len(registry.versions(f"{topic}-value")) == 3

    got, warnings = _read(uri, EventDecoder(registry_url=registry.url))
    assert warnings == [] and [e["request_id"] for e in got] == [e["request_id"] for e in v1 + current + nxt]
    assert all("priority" not in e for e in got)

    decoder = EventDecoder(registry_url=registry.url)
    decoder.codec = AvroCodec(next_schema())
    got, warnings = _read(uri, decoder)
    assert warnings == [] and [e["priority"] for e in got] == [None] * 6 + ["p0", "p1", "p2"]


def test_a_registry_outage_while_running(kafka, registry, topic):
    """The publisher registered before the outage keeps producing (its id is cached); a consumer that has
    seen the id keeps decoding (schemas cached by id); one that has not gets a Transient error (retried,
    never dead-lettered) until the registry is back. Storage survives the crash: same subject, same id."""
    uri = f"kafka://{kafka.bootstrap}/{topic}"
    codec = AvroCodec()
    sink = open_event_sink(uri, codec, registry_url=registry.url, topic_partitions=1)
    _publish(sink, [event(i) for i in range(4)])
    warm = EventDecoder(registry_url=registry.url)
    got, warnings = _read(uri, warm)
    assert len(got) == 4 and warnings == []

    registry.kill()
    assert not registry.alive
    _publish(sink, [event(10 + i) for i in range(5)])  # no registry call: the cached id
    got, warnings = _read(uri, warm)
    assert len(got) == 9 and warnings == []
    cold = EventDecoder(registry_url=registry.url)
    raw = read_topic(kafka.bootstrap, topic, 9)
    with pytest.raises(Transient, match="schema registry"):
        cold.decode(raw[0].value())
    # A publisher starting now cannot register: it starts anyway, its events wait (none sent, none failed)
    # and go out once the registry answers.
    t0 = time.monotonic()
    late = open_event_sink(uri, AvroCodec(), registry_url=registry.url)
    assert time.monotonic() - t0 < 30 and late.codec.schema_id is None  # the registry client's retries, then on
    done: list = []
    for i in range(3):
        late.publish(event(20 + i), done.append)
    assert late.flush(2) == 3 and done == []  # waiting for the registry, not failed

    registry.restart()
    assert [_decode_retrying(cold, m.value())["request_id"] for m in raw] == [f"req-{i}" for i in range(4)] + \
        [f"req-{10 + i}" for i in range(5)]
    assert late.flush(60) == 0 and done == [None] * 3
    assert late.codec.schema_id == codec.schema_id  # the registry kept the subject and its id
    late.close()
    sink.close()
    got, warnings = _read(uri, EventDecoder(registry_url=registry.url))
    assert warnings == [] and len(got) == 12
    assert [e["request_id"] for e in got] == [f"req-{i}" for i in range(4)] + [f"req-{10 + i}" for i in range(5)] + \
        [f"req-{20 + i}" for i in range(3)]



def test_a_registry_that_accepts_and_never_answers(kafka, registry, topic, monkeypatch):
    """A hung registry (SIGSTOP: the kernel still accepts connections, nobody answers). The publisher's
    start waits a bounded time, then its loop never waits on the registry again: publish and poll return
    at once while its events wait, and all go out once it answers. The consumer's lookup ends in a
    Transient error after the client's default timeout instead of hanging its loop."""
    from publisher.event_sinks.kafka import KafkaSink

    uri = f"kafka://{kafka.bootstrap}/{topic}"
    monkeypatch.setattr(KafkaSink, "REGISTRY_START_WAIT_S", 3.0)
    sink = open_event_sink(uri, AvroCodec(), registry_url=registry.url, topic_partitions=1)
    _publish(sink, [event(i) for i in range(2)])
    value = read_topic(kafka.bootstrap, topic, 2)[0].value()

    registry.pause()
    t0 = time.monotonic()
    late = open_event_sink(uri, AvroCodec(), registry_url=registry.url)
    assert 3 <= time.monotonic() - t0 < 10 and late.codec.schema_id is None
    done: list = []
    slowest = 0.0
    for i in range(3):
        t = time.monotonic()
        late.publish(event(20 + i), done.append)
        late.poll(0)
        slowest = max(slowest, time.monotonic() - t)
    assert slowest < 1.0, f"the caller's loop waited {slowest:.1f} s on a hung registry"
    assert late.flush(2) == 3 and done == []  # waiting for the registry, not failed

    cold = EventDecoder(registry_url=registry.url)
    t0 = time.monotonic()
    with pytest.raises(Transient, match="schema registry"):
        cold.decode(value)
    assert time.monotonic() - t0 < 15  # the default timeout (10 s), once: not forever, nor four times
    t0 = time.monotonic()
    with pytest.raises(Transient, match="asked again after 5 s"):
        cold.decode(value)  # the next record's lookup fails at once for a while
    assert time.monotonic() - t0 < 1

    registry.resume()
    assert late.flush(60) == 0 and done == [None] * 3
    assert late.codec.schema_id == sink.codec.schema_id
    late.close()
    sink.close()
    got, warnings = _read(uri, EventDecoder(registry_url=registry.url))
    assert warnings == [] and [e["request_id"] for e in got] == ["req-0", "req-1", "req-20", "req-21", "req-22"]


def test_registry_auth_settings_pass_through(kafka, schema_registry_with_auth):
    """The publisher's ``schema_registry`` settings and the consumer's registry settings reach the registry:
    with ``basic.auth.user.info`` both work; without it the registry answers 401 to each."""
    registry = schema_registry_with_auth
    topic = f"auth-{uuid.uuid4().hex[:8]}"
    uri = f"kafka://{kafka.bootstrap}/{topic}"
    assert registry.set_compatibility(f"{topic}-value", "FULL") == "FULL"
    auth = {"basic.auth.user.info": registry.user_info}
    with pytest.raises(Exception, match="401"):
        open_event_sink(uri, AvroCodec(), registry_url=registry.url)
    sink = open_event_sink(uri, AvroCodec(), registry_url=registry.url, registry_settings=auth, topic_partitions=1)
    _publish(sink, [event(i) for i in range(3)])
    sink.close()
    assert registry.versions(f"{topic}-value") == [1]

    got, warnings = _read(uri, EventDecoder(registry_url=registry.url, registry_conf=auth))
    assert warnings == [] and [e["request_id"] for e in got] == ["req-0", "req-1", "req-2"]
    value = read_topic(kafka.bootstrap, topic, 3)[0].value()
    with pytest.raises(Transient, match="401"):
        EventDecoder(registry_url=registry.url).decode(value)
