"""``vllm-mm-events events``: the decoded events of a source, filtered, printed; read-only.

The source is opened as the consumer opens it (``consumers.sources``, ``read_only``: from the
beginning, no group joined, no offsets or checkpoints written) and values are decoded as the
consumer decodes them (``consumers.decoder``: single-object or Confluent framing). A record
that does not decode is reported on stderr with where it lies, and skipped.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

from consumers.decoder import EventDecoder
from consumers.errors import Poison, Transient
from consumers.sources.base import EventSource, SourceRecord

FORMATS = ("table", "json")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
POLL_RECORDS = 256
POLL_TIMEOUT_S = 0.5
DECODE_RETRIES = 5  # a registry that is away: retried this many times, then the record is skipped


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO-8601 time (without an offset: local time) or a duration back from now
    (``90s``, ``10m``, ``2h``, ``1d``, ``1w``, or combined: ``1h30m``) -> an aware datetime."""
    s = text.strip()
    if s and _DURATION.sub("", s.lower()) == "":
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(s.lower()))
        return (now or datetime.now(timezone.utc)) - timedelta(seconds=seconds)
    try:
        t = datetime.fromisoformat(s[:-1] + "+00:00" if s[-1:] in ("Z", "z") else s)
    except ValueError:
        raise ValueError(f"--since: expected an ISO-8601 time (2025-05-01T12:00:00Z, 2025-05-01) or a duration "
                         f"back from now (30s, 10m, 2h, 1d, 1h30m), got {text!r}") from None
    return t if t.tzinfo is not None else t.astimezone()  # naive: the local time zone


def parse_where(items: list[str] | None) -> dict[str, str]:
    """``--where key=value`` (repeatable) -> {key: value}; every pair must match the event's ``metadata``."""
    out: dict[str, str] = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--where: expected key=value (a key of the event's metadata), got {item!r}")
        if key in out and out[key] != value:
            raise ValueError(f"--where: {key} given twice with different values ({out[key]!r}, {value!r}); "
                             "conditions are ANDed, so nothing could match")
        out[key] = value
    return out


@dataclass
class EventFilter:
    request_id: str | None = None
    where: dict[str, str] = field(default_factory=dict)
    since: datetime | None = None

    def matches(self, event: dict[str, Any]) -> bool:
        if self.request_id is not None and event.get("request_id") != self.request_id:
            return False
        metadata = event.get("metadata") or {}
        if any(metadata.get(k) != v for k, v in self.where.items()):
            return False
        return self.since is None or event_time(event) >= self.since


def event_time(event: dict[str, Any]) -> datetime:
    t = event.get("event_time")
    if isinstance(t, datetime):
        return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(int(t) / 1000, timezone.utc)  # a record not read through a schema


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return _iso(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def to_json(event: dict[str, Any]) -> str:
    """One line: the event as decoded, times as ISO-8601 UTC (``...Z``), bytes as base64."""
    return json.dumps(event, default=_jsonable, ensure_ascii=False)


TABLE_HEADER = f"{'TIME (UTC)':<24} {'REQUEST_ID':<24} {'MODEL':<24} {'ITEMS':<14} {'MISSING':>7}  EVENT_ID"


def to_table_row(event: dict[str, Any]) -> str:
    """One compact line: time, request id, model, items per modality, missing count, event id."""
    kinds = Counter(str(e.get("modality")) for e in event.get("embeddings") or ())
    items = ",".join(f"{m}:{n}" for m, n in sorted(kinds.items())) or "-"
    return (f"{_iso(event_time(event)):<24} {str(event.get('request_id')):<24} {str(event.get('model')):<24} "
            f"{items:<14} {len(event.get('missing_embeddings') or ()):>7}  {event.get('event_id')}")


def _where(coords: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in coords.items())


def read_events(source: EventSource, decoder: EventDecoder, follow: bool,
                warn: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Every event of ``source`` in order; without ``follow``, until what is there now is read.
    A record that does not decode is reported through ``warn`` (one line, with its coordinates)."""
    while True:
        records = source.poll(POLL_RECORDS, POLL_TIMEOUT_S)
        for r in records:
            event = _decode(r, decoder, warn)
            if event is not None:
                yield event
        if not records and not follow and source.caught_up():
            return


def _decode(r: SourceRecord, decoder: EventDecoder, warn: Callable[[str], None]) -> dict[str, Any] | None:
    if r.error:
        warn(f"skipped an unreadable record at {_where(r.coords)}: {r.error}")
        return None
    if r.event is not None:
        return r.event
    delay = 0.5
    for attempt in range(DECODE_RETRIES + 1):
        try:
            return decoder.decode(r.value)
        except Poison as p:
            warn(f"skipped an undecodable record at {_where(r.coords)}: {p.kind}: {p}")
            return None
        except Transient as t:
            if attempt == DECODE_RETRIES:
                warn(f"skipped a record at {_where(r.coords)}: {t} (still failing after {attempt} retries; "
                     "check VLLM_MM_EVENTS_SCHEMA_REGISTRY_URL)")
                return None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    return None
