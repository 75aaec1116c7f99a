"""Event sinks: where ``MMEmbeddingEvent`` records go.

Contract (tests/contract/test_event_sink.py runs it against every backend):
- ``publish(event, on_done)`` hands one record over; ``on_done(err)`` is called exactly
  once, from ``poll``/``flush``, when the record is durable (err None) or finally failed.
- ``poll(timeout)`` serves callbacks; ``flush(timeout)`` waits for everything handed over
  and returns how many records are still undelivered.
"""

from __future__ import annotations

import fcntl
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

import fastavro

from publisher.events import AvroCodec, cloudevent_headers

log = logging.getLogger("vllm_mm_events.sinks")
DoneCallback = Callable[[Exception | None], None]


class EventSink(ABC):
    @abstractmethod
    def publish(self, event: Mapping[str, Any], on_done: DoneCallback) -> None: ...

    def poll(self, timeout: float = 0.0) -> None:
        pass

    @abstractmethod
    def flush(self, timeout: float) -> int: ...

    def close(self) -> None:
        pass


class AvroFileSink(EventSink):
    """An Avro object-container file, appended to (the embedded default).

    Each ``flush`` writes one block and fsyncs, under an exclusive ``flock`` so several
    engines may share one log. Readers can follow the file as it grows: every block is
    self-delimited by the file's sync marker.
    """

    def __init__(self, path: str | os.PathLike, codec: AvroCodec, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.codec = codec
        self.fsync = fsync
        self._pending: list[tuple[Mapping[str, Any], DoneCallback]] = []

    def publish(self, event, on_done):
        self._pending.append((event, on_done))

    def poll(self, timeout: float = 0.0) -> None:
        if self._pending:
            self.flush(timeout)

    def flush(self, timeout: float) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        err: Exception | None = None
        try:
            with open(self.path, "a+b") as fo:
                fcntl.flock(fo, fcntl.LOCK_EX)
                # fastavro appends to a non-empty 'a+b' file: it reads the existing header
                # (schema, sync marker) and writes one new block.
                fastavro.writer(fo, self.codec.parsed, [e for e, _ in batch], codec="null")
                fo.flush()
                if self.fsync:
                    os.fsync(fo.fileno())
        except Exception as e:  # noqa: BLE001 - reported through every callback
            err = e
        for _, cb in batch:
            cb(err)
        return 0


class KafkaSink(EventSink):
    """Apache Kafka via librdkafka: idempotent, acks=all, keyed by request_id.

    librdkafka retries transient errors itself; a record that still fails (for example
    after ``message.timeout.ms``) is produced again up to ``resend_attempts`` times, then
    reported failed.
    """

    resend_attempts = 3

    def __init__(self, bootstrap: str, topic: str, codec: AvroCodec, settings: Mapping[str, Any] | None = None,
                 registry_url: str | None = None, registry_settings: Mapping[str, Any] | None = None,
                 topic_partitions: int = 0):
        from confluent_kafka import Producer

        self.topic = topic
        self.codec = codec
        conf = {
            "bootstrap.servers": bootstrap,
            "client.id": "vllm-mm-events",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": 120000,
        }
        conf.update(settings or {})
        for forced in ("enable.idempotence", "acks"):
            if str(conf[forced]).lower() not in ("true", "all", "-1"):
                raise ValueError(f"kafka.{forced}: the publisher needs idempotent acks=all delivery")
        if topic_partitions:
            self._ensure_topic(conf, topic, topic_partitions)
        if registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            codec.use_registry(SchemaRegistryClient.new_client({"url": registry_url, **(registry_settings or {})}),
                               f"{topic}-value")
        # librdkafka's own log lines go through our logger (served by poll), not raw stderr.
        self._producer = Producer(conf, logger=logging.getLogger("vllm_mm_events.kafka"))
        self.resends = 0

    @staticmethod
    def _ensure_topic(conf: Mapping[str, Any], topic: str, partitions: int) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin_conf = {k: v for k, v in conf.items() if not k.startswith(("linger", "compression", "acks", "enable.idem",
                                                                          "message.timeout", "batch", "queue.buff"))}
        admin = AdminClient(admin_conf)  # keep a reference: the future dies with its client
        fut = admin.create_topics([NewTopic(topic, partitions)])[topic]
        try:
            fut.result(30)
        except KafkaException as e:
            if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise

    def publish(self, event, on_done, _attempt: int = 0):
        value = self.codec.encode(event)
        headers = cloudevent_headers(event, self.codec.content_type)
        key = event["request_id"].encode()

        def delivered(err, _msg):
            if err is None:
                on_done(None)
            elif _attempt < self.resend_attempts:
                self.resends += 1
                log.warning("event %s: delivery failed (%s); producing it again", event["event_id"], err.name())
                self.publish(event, on_done, _attempt + 1)
            else:
                on_done(RuntimeError(f"Kafka delivery failed: {err.name()}: {err.str()}"))

        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=delivered)
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain

    def poll(self, timeout: float = 0.0) -> None:
        self._producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        return self._producer.flush(timeout)


def open_event_sink(uri: str, codec: AvroCodec, *, kafka: Mapping[str, Any] | None = None,
                    registry_url: str | None = None, registry_settings: Mapping[str, Any] | None = None,
                    fsync: bool = True, topic_partitions: int = 0) -> EventSink:
    """``kafka://h:p[,h:p]/topic`` or ``file:///path/events.avro`` -> sink. The one place a backend is chosen."""
    u = urlsplit(uri)
    if u.scheme == "kafka":
        return KafkaSink(u.netloc, u.path.lstrip("/"), codec, kafka, registry_url, registry_settings,
                         topic_partitions)
    if u.scheme == "file":
        return AvroFileSink(unquote(u.path), codec, fsync=fsync)
    raise ValueError(f"event_sink: expected kafka://host:port/topic or file:///path, got {uri!r}")
