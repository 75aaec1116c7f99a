"""The embedded event log's file format: an Avro object container file (Avro spec, "Object Container
Files"). A header (magic, metadata with the writer schema, a 16-byte sync marker), then blocks: a
record count, a byte length, the records, and the sync marker again. The publisher's file sink writes
it (through fastavro) and the consumer's file source follows it; both read its header here."""

from __future__ import annotations

import io
from typing import NamedTuple

import fastavro

MAGIC = b"Obj\x01"

HEADER_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "org.apache.avro.file.Header", "fields": [
        {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
        {"name": "meta", "type": {"type": "map", "values": "bytes"}},
        {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}}]})


class Header(NamedTuple):
    magic: bytes
    meta: dict[str, bytes]
    sync: bytes
    end: int  # the first block's offset


def read_header(head: bytes) -> Header | None:
    """The header at the start of ``head``, or None where it is incomplete (still being written, or cut
    short). The caller checks ``magic``."""
    buf = io.BytesIO(head)
    try:
        h = fastavro.schemaless_reader(buf, HEADER_SCHEMA)
    except Exception:  # noqa: BLE001 - bytes that end before the header does
        return None
    return Header(h["magic"], h["meta"], h["sync"], buf.tell())
