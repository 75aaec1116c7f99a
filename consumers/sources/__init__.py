"""Event sources behind one interface (``base.EventSource``): ``kafka`` (a topic, as a consumer
group) and ``event_log`` (the publisher's embedded Avro log). ``open_source`` chooses.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from consumers.sources.base import EventSource, SourceRecord

__all__ = ["EventSource", "SourceRecord", "open_source"]


def open_source(uri: str, group: str, *, kafka: dict, checkpoint: str | None, reader_schema: dict) -> EventSource:
    """``kafka://host:port/topic`` or ``file:///path/events.avro``."""
    if urlsplit(uri).scheme == "kafka":
        from consumers.sources.kafka import KafkaSource

        return KafkaSource(uri, group, kafka)
    from consumers.sources.event_log import AvroLogSource

    return AvroLogSource(uri, group, checkpoint, reader_schema)
