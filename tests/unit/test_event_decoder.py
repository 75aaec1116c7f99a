"""The consumer's decoder without a registry: the single-object framing, and poison for anything else
(tests/backends/test_schema_registry.py decodes the Confluent framing through a real registry)."""


import fastavro
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


# A writer schema from a registry is input like any other. These two made the reader itself fail:
# run in a child process, as the old code segfaulted (no handler catches it) or looped for good.
DECODE_WITH_WRITER = """
import json, sys
from schemas.codec import AvroCodec, UnknownSchema
writer, value = json.loads(sys.stdin.read())
try:
    AvroCodec().decode(bytes.fromhex(value), lambda schema_id: writer)
    print("decoded")
except UnknownSchema as e:
    print("UnknownSchema:", e)
"""


def decode_in_child(writer: dict, value: bytes) -> str:
    import json
    import subprocess
    import sys
    from pathlib import Path

    p = subprocess.run([sys.executable, "-c", DECODE_WITH_WRITER], input=json.dumps([writer, value.hex()]),
                       cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    return p.stdout


def test_a_writer_schema_with_a_type_containing_itself_is_refused_before_any_body_is_read(event):
    """A recursive union 20,000 levels deep (20 KB) overflowed the C stack of fastavro's reader."""
    codec = AvroCodec()
    node = {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]}
    writer = dict(codec.schema_dict, fields=[*codec.schema_dict["fields"],
                                             {"name": "x", "type": ["null", node], "default": None}])
    value = b"\x00\x00\x00\x00\x07" + codec.encode(event)[10:] + b"\x02" * 20_000 + b"\x00"
    out = decode_in_child(writer, value)
    assert "UnknownSchema" in out and "Node contains itself" in out, out


def test_an_array_of_empty_records_named_by_full_name_is_refused(event):
    """The zero-width check looked records up by their short name: named by the full one, an array of
    2^62 empty records (10 bytes) held the reader's loop at 100% CPU for good."""
    codec = AvroCodec()
    empty = {"type": "record", "name": "Empty", "fields": []}
    writer = dict(codec.schema_dict, fields=[
        *codec.schema_dict["fields"], {"name": "e", "type": ["null", empty], "default": None},
        {"name": "x", "type": {"type": "array", "items": f"{codec.schema_dict['namespace']}.Empty"}, "default": []}])
    value = b"\x00\x00\x00\x00\x07" + codec.encode(event)[10:] + b"\x00" + b"\xfe" * 8 + b"\x7f" + b"\x00"
    out = decode_in_child(writer, value)
    assert "UnknownSchema" in out and "items of no size" in out, out


@pytest.mark.parametrize("fields,refused", [
    # a size-0 fixed named again by reference (fastavro's parsed form names every repeat so): refused
    ([{"name": "a", "type": {"type": "fixed", "name": "Z", "size": 0}},
      {"name": "b", "type": {"type": "array", "items": "Z"}}], True),
    # an array of a union: every item writes its branch index, a byte at least: fine
    ([{"name": "e", "type": {"type": "record", "name": "Empty", "fields": []}},
      {"name": "b", "type": {"type": "array", "items": ["null", "Empty"]}}], False),
    ([{"name": "b", "type": {"type": "array", "items": "null"}}], True),
])
def test_zero_width_arrays_are_found_by_reference_and_unions_are_not_taken_for_them(fields, refused):
    from schemas.codec import unreadable_writer_schema

    parsed = fastavro.parse_schema({"type": "record", "name": "T", "namespace": "n", "fields": fields})
    assert (unreadable_writer_schema(parsed) is not None) == refused


def test_the_projects_own_schemas_are_readable():
    from schemas import event_schema, released_schemas
    from schemas.codec import unreadable_writer_schema

    for schema in [event_schema(), *(s for _, s in released_schemas())]:
        assert unreadable_writer_schema(fastavro.parse_schema(schema)) is None
