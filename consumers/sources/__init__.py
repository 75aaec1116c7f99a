"""Event sources behind one interface (``base.EventSource``): ``kafka`` (a topic, as a consumer
group) and ``event_log`` (the publisher's embedded Avro log). ``open_source`` chooses.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from consumers.sources.base import EventSource, SourceNotFound, SourceRecord, SourceUnreadable

__all__ = ["EventSource", "SourceNotFound", "SourceRecord", "SourceUnreadable", "open_source"]


def open_source(uri: str, group: str, *, kafka: dict, checkpoint: str | None, reader_schema: dict,
                read_only: bool = False) -> EventSource:
    """``kafka://host:port/topic`` or ``file:///path/events.avro``.

    ``read_only``: everything from the beginning, never committed (``vllm-mm-events events``):
    Kafka partitions are assigned directly (no group joined, no offsets stored), the file's
    checkpoints are neither read nor written; ``commit`` raises."""
    if urlsplit(uri).scheme == "kafka":
        from consumers.sources.kafka import KafkaSource

        return KafkaSource(uri, group, kafka, read_only=read_only)
    from consumers.sources.event_log import AvroLogSource

    return AvroLogSource(uri, group, checkpoint, reader_schema, read_only=read_only)
