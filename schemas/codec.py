"""The one codec for ``MMEmbeddingEvent`` values: record <-> bytes, in either framing.

- Without a registry: Avro single-object encoding (0xC3 0x01 + the 8-byte little-endian
  CRC-64-AVRO fingerprint of the schema's canonical form + the body). A reader resolves the
  writer schemas it knows by fingerprint: its own and, for the shipped schema, every released
  version (``schemas/history/``), so a consumer reads what older publishers wrote. A newer
  publisher's schema is unknown to an older consumer (``UnknownSchema``): forward compatibility
  without a registry is impossible by construction (README, "Schema evolution").
- With a registry: the Confluent wire format (0x00 + 4-byte big-endian schema id + body);
  the writer registers the schema once, under ``<topic>-value``; a reader resolves writer
  schemas by id through a callback (the consumer's registry client).

Decoding failures are typed (``UndecodableEvent``, ``UnknownSchema``) so a reader can
dead-letter them by kind.
"""

from __future__ import annotations

import io
import json
import struct
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas import event_schema, released_schemas
from schemas.avro_encoder import compile_encoder

CONTENT_TYPE_SINGLE_OBJECT = "application/avro"  # Avro single-object encoding
CONTENT_TYPE_CONFLUENT = "application/vnd.confluent.avro"  # 0x00 + schema id
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"

# Resolves a Confluent schema id to the writer's schema (a parsed-JSON dict). It raises
# what its caller wants raised: the consumer maps a registry outage to a retry.
WriterSchemaLookup = Callable[[int], dict]


class EventDecodeError(ValueError):
    """A value that cannot be read as an event. ``kind`` names the reason for dead letters."""

    kind = "undecodable"


class UndecodableEvent(EventDecodeError):
    """Neither framing, or an Avro body that does not decode."""

    kind = "undecodable"


class UnknownSchema(EventDecodeError):
    """A schema this reader does not know: another fingerprint, or a registry id it cannot resolve."""

    kind = "unknown_schema"


def unreadable_writer_schema(parsed: Any) -> str | None:
    """Why a writer schema from outside (a registry entry, an event log's header) must not be read with, or
    None. ``parsed`` is as ``fastavro.parse_schema`` returns it: every name full, every reference by it.

    - An array whose items take no bytes (``null``, an empty record, ``fixed`` of size 0): a reader
      would loop over an item count the bytes never pay for (2^62 items in a few bytes).
    - A type that contains itself: fastavro's compiled reader recurses once per level with no limit,
      and a value nesting it ten thousand levels deep (20 KB) overflows the C stack, a segfault no
      handler catches (and the same record again at every restart).

    Neither is in any schema this project writes; the checks run before any body is read."""
    where = _zero_width_array(parsed)
    if where is not None:
        return (f"the array at {where or '(top)'} has items of no size (a reader would loop over counts no bytes "
                "pay for)")
    name = _recursive_type(parsed)
    if name is not None:
        return f"the type {name} contains itself (a value could nest it deeper than a reader's stack)"
    return None


def _zero_width_array(schema: Any) -> str | None:
    named: dict[str, bool] = {}

    def zero(s: Any) -> bool:
        if isinstance(s, str):
            return s == "null" or named.get(s, False)
        if isinstance(s, list):
            return False  # a union writes its branch's index: a byte at least
        if not isinstance(s, dict):
            return False
        t = s.get("type")
        if t == "record":
            named[s.get("name", "")] = False  # recursion guard; a recursive record is not zero-width
            z = all(zero(f.get("type")) for f in s.get("fields", []) if isinstance(f, dict))
            named[s.get("name", "")] = z
            return z
        if t == "fixed":
            named[s.get("name", "")] = s.get("size") == 0  # named again by reference, later
            return s.get("size") == 0
        return zero(t) if isinstance(t, (str, list, dict)) else False  # {"type": "null"}, {"type": "<a name>"}

    def walk(s: Any, path: str) -> str | None:
        if isinstance(s, list):
            return next((p for b in s if (p := walk(b, path)) is not None), None)
        if not isinstance(s, dict):
            return None
        t = s.get("type")
        if t == "array":
            return path if zero(s.get("items")) else walk(s.get("items"), path + "[]")
        if t == "map":
            return walk(s.get("values"), path + "{}")
        if t == "record":
            zero(s)  # registers the record's name
            for f in s.get("fields", []):
                if isinstance(f, dict) and (p := walk(f.get("type"), f"{path}.{f.get('name')}")) is not None:
                    return p
        return walk(t, path) if isinstance(t, (dict, list)) else None

    return walk(schema, "")


def _recursive_type(schema: Any) -> str | None:
    """The full name of a record that contains itself (through any path of fields), or None."""
    defined: dict[str, Any] = {}
    checked: set[str] = set()

    def visit(s: Any, inside: frozenset[str]) -> str | None:
        if isinstance(s, str):  # a primitive, or a reference to a named type defined before
            if s in inside:
                return s
            return visit(defined[s], inside) if s in defined and s not in checked else None
        if isinstance(s, list):
            return next((r for b in s if (r := visit(b, inside)) is not None), None)
        if not isinstance(s, dict):
            return None
        t = s.get("type")
        if t in ("record", "error") and isinstance(s.get("name"), str):
            name = s["name"]
            if name in inside:
                return name
            defined[name] = s
            for f in s.get("fields", []):
                if isinstance(f, dict) and (r := visit(f.get("type"), inside | {name})) is not None:
                    return r
            checked.add(name)
            return None
        if t == "array":
            return visit(s.get("items"), inside)
        if t == "map":
            return visit(s.get("values"), inside)
        return visit(t, inside) if isinstance(t, (str, list, dict)) else None

    return visit(schema, frozenset())


def schema_fingerprint(parsed_schema: Any) -> int:
    """CRC-64-AVRO of the schema's parsing canonical form (the Avro spec's Rabin fingerprint).

    fastavro gives it as the hex of its little-endian bytes, the order the single-object
    header carries; as a number it is read back little-endian.
    """
    return int.from_bytes(bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed_schema), "CRC-64-AVRO")),
                          "little")


@lru_cache(maxsize=1)
def _released_writers() -> tuple[tuple[int, Any], ...]:
    return tuple((schema_fingerprint(p), p) for p in (fastavro.parse_schema(s) for _, s in released_schemas()))


REGISTRY_TIMEOUT_S = 10


def registry_client(url: str, settings: Mapping[str, Any] | None = None):
    """The one way this project opens a Schema Registry client: Confluent's, with a timeout on every
    HTTP request (``timeout``, seconds, 10 unless set; its own default is none, and a registry that
    accepts connections but never answers would hold the caller for good) and no retries of its own
    (``max.retries`` 0 unless set: every caller retries with its own backoff, and the client's three
    retries made one lookup of a silent registry last 40 s)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client({"timeout": REGISTRY_TIMEOUT_S, "max.retries": 0, **(settings or {}),
                                            "url": url})


class AvroCodec:
    """Encodes and decodes ``MMEmbeddingEvent`` values (see the module docstring for the framings).

    ``schema``: the one it writes, and reads into (default: the shipped schema). ``writers``: other
    schemas it reads single-object values of, by fingerprint (default: with the shipped schema, every
    released version; with another schema, none)."""

    def __init__(self, schema: dict | None = None, writers: Iterable[dict] | None = None):
        self.schema_dict = schema or event_schema()
        self.parsed = fastavro.parse_schema(self.schema_dict)
        self.fingerprint = schema_fingerprint(self.parsed)
        known = _released_writers() if writers is None and schema is None else tuple(
            (schema_fingerprint(p), p) for p in (fastavro.parse_schema(w) for w in writers or ()))
        self._by_fingerprint: dict[int, Any] = {fp: p for fp, p in known}
        self._by_fingerprint[self.fingerprint] = self.parsed
        self.single_object_header = SINGLE_OBJECT_MAGIC + struct.pack("<Q", self.fingerprint)
        self.schema_id: int | None = None
        self._header = self.single_object_header
        self._encode_body = compile_encoder(self.schema_dict)
        self._writers: dict[int, Any] = {}  # Confluent schema id -> parsed writer schema

    def is_older_writer(self, fingerprint: int) -> bool:
        """Whether ``fingerprint`` is of a schema this codec reads but does not write (an earlier release)."""
        return fingerprint != self.fingerprint and fingerprint in self._by_fingerprint

    def use_registry(self, client, subject: str) -> None:
        """Register the schema under ``subject``; from now on values use the Confluent framing."""
        from confluent_kafka.schema_registry import Schema

        self.schema_id = client.register_schema(subject, Schema(json.dumps(self.schema_dict), "AVRO"))
        self._header = CONFLUENT_MAGIC + struct.pack(">I", self.schema_id)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPE_SINGLE_OBJECT if self.schema_id is None else CONTENT_TYPE_CONFLUENT

    def encode(self, record: Mapping[str, Any]) -> bytes:
        out = bytearray(self._header)
        self._encode_body(out, record)
        return bytes(out)

    def decode(self, data: bytes, writer_schema: WriterSchemaLookup | None = None) -> dict[str, Any]:
        """Either framing -> the record, resolved to this codec's schema.

        A Confluent-framed value's writer schema comes from ``writer_schema(schema_id)``
        (cached per id); our own registered id needs no lookup.
        """
        if data[:2] == SINGLE_OBJECT_MAGIC and len(data) >= 10:
            (fp,) = struct.unpack("<Q", data[2:10])
            writer = self._by_fingerprint.get(fp)
            if writer is None:
                raise UnknownSchema(f"unknown schema fingerprint {fp:#018x}; this reader knows MMEmbeddingEvent's "
                                    f"{self.fingerprint:#018x}"
                                    + (f" and {len(self._by_fingerprint) - 1} other released version(s)"
                                       if len(self._by_fingerprint) > 1 else ""))
            body = data[10:]
        elif data[:1] == CONFLUENT_MAGIC and len(data) >= 5:
            (schema_id,) = struct.unpack(">I", data[1:5])
            body, writer = data[5:], self._writer(schema_id, writer_schema)
        else:
            raise UndecodableEvent("not an Avro single-object or Confluent-framed value "
                                   f"(first bytes {data[:4].hex() or 'empty'})")
        try:
            return fastavro.schemaless_reader(io.BytesIO(body), writer, self.parsed)
        except Exception as e:  # noqa: BLE001 - any read failure means the bytes are bad
            raise UndecodableEvent(f"Avro body does not decode: {type(e).__name__}: {e}") from None

    def _writer(self, schema_id: int, lookup: WriterSchemaLookup | None) -> Any:
        if schema_id == self.schema_id:
            return self.parsed
        if schema_id in self._writers:
            return self._writers[schema_id]
        if lookup is None:
            raise UnknownSchema(f"Confluent-framed value (schema id {schema_id}) and no schema registry "
                                "configured (--schema-registry-url)")
        schema = lookup(schema_id)
        try:
            writer = fastavro.parse_schema(schema)
        except Exception as e:  # noqa: BLE001 - a registry entry we cannot read
            raise UnknownSchema(f"schema id {schema_id} is not a usable Avro schema: {e}") from None
        if (why := unreadable_writer_schema(writer)) is not None:
            raise UnknownSchema(f"schema id {schema_id}: {why}; refused")
        self._writers[schema_id] = writer
        return writer


def to_wire(value: Any) -> Any:
    """A decoded record back into encodable form: fastavro reads timestamp-millis as datetimes."""
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_wire(v) for v in value]
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1000)
    return value
