"""The embedded event log's file format: an Avro object container file (Avro spec, "Object Container
Files"). A header (magic, metadata with the writer schema, a 16-byte sync marker), then blocks: a
record count, a byte length, the records, and the sync marker again. The publisher's file sink writes
it (through fastavro) and the consumer's file source follows it; both read its header here."""

from __future__ import annotations

import io
import re
import time
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


# A log the publisher moved aside (it holds an earlier release's schema): ``<name>.<UTC time>[.<n>]``.
# Readers find such logs beside the path, and their order, by this name.
_MOVED_ASIDE = re.compile(r"\.(\d{8}T\d{6}Z)(?:\.(\d+))?")


def moved_aside_name(name: str, n: int = 0) -> str:
    """The name a log called ``name`` is moved aside to now (``n``: the how-many-th this second)."""
    return f"{name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}" + (f".{n}" if n else "")


def moved_aside_order(name: str, candidate: str) -> tuple[str, int] | None:
    """The sort key of ``candidate`` if it is a log moved aside from ``name`` (oldest first), else None."""
    if not candidate.startswith(name):
        return None
    m = _MOVED_ASIDE.fullmatch(candidate, len(name))
    return (m[1], int(m[2] or 0)) if m else None
