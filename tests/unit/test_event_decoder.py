"""The consumer's decoder without a registry: the single-object framing, and poison for anything else
(tests/backends/test_schema_registry.py decodes the Confluent framing through a real registry)."""


import pytest

from consumers.decoder import EventDecoder
from consumers.errors import Poison
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec, to_wire

import synth


@pytest.fixture
def event(tmp_path):
    return synth.make_event(LocalDirStore(tmp_path), "p", "req-1", [synth.features(1)], {"k": "v"})[0]


def test_single_object_round_trip(event):
    got = EventDecoder().decode(AvroCodec().encode(event))
    assert to_wire(got) == event


def test_confluent_framing_without_a_registry_is_unknown_schema(event):
    codec = AvroCodec()
    value = b"\x00\x00\x00\x00\x07" + codec.encode(event)[10:]
    with pytest.raises(Poison, match="no schema registry configured") as e:
        EventDecoder().decode(value)
    assert e.value.kind == "unknown_schema"


@pytest.mark.parametrize("value,kind", [
    (b"", "undecodable"),
    (b"{\"json\": true}", "undecodable"),
    (b"\xc3\x01" + b"\x00" * 8 + b"body", "unknown_schema"),
])
def test_other_bytes_are_poison(value, kind):
    with pytest.raises(Poison) as e:
        EventDecoder().decode(value)
    assert e.value.kind == kind


def test_truncated_body_is_undecodable(event):
    value = AvroCodec().encode(event)
    with pytest.raises(Poison) as e:
        EventDecoder().decode(value[: len(value) // 2])
    assert e.value.kind == "undecodable"
