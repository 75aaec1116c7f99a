"""Event sinks behind one interface (``base.EventSink``): ``avro_file`` (the embedded event
log) and ``kafka``. ``open_event_sink`` is the one place a backend is chosen.
"""

from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from publisher.event_sinks.base import DoneCallback, EventSink
from schemas.codec import AvroCodec

__all__ = ["DoneCallback", "EventSink", "open_event_sink"]


def open_event_sink(uri: str, codec: AvroCodec, *, kafka: Mapping[str, Any] | None = None,
                    registry_url: str | None = None, registry_settings: Mapping[str, Any] | None = None,
                    fsync: bool = True, topic_partitions: int = 0) -> EventSink:
    """``kafka://h:p[,h:p]/topic`` or ``file:///path/events.avro`` -> sink. The one place a backend is chosen."""
    u = urlsplit(uri)
    if u.scheme == "kafka":
        from publisher.event_sinks.kafka import KafkaSink

        return KafkaSink(u.netloc, u.path.lstrip("/"), codec, kafka, registry_url, registry_settings,
                         topic_partitions)
    if u.scheme == "file":
        from publisher.event_sinks.avro_file import AvroFileSink

        return AvroFileSink(unquote(u.path), codec, fsync=fsync)
    raise ValueError(f"event_sink: expected kafka://host:port/topic or file:///path, got {uri!r}")
