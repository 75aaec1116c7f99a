"""Apache Kafka event sink (librdkafka), and the one producer setup the product uses."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from publisher.event_sinks.base import EventSink
from schemas.cloudevents import cloudevent_headers
from schemas.codec import AvroCodec

log = logging.getLogger("vllm_mm_events.kafka")


def producer_config(bootstrap: str, client_id: str, settings: Mapping[str, Any] | None = None,
                    defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """librdkafka producer settings: idempotent, acks=all (enforced), lingering 5 ms, then
    ``defaults`` and the user's ``settings``. Used by the event sink and the dead-letter queue.
    librdkafka's own log lines go through our logger (served by poll), not raw stderr."""
    conf = {"bootstrap.servers": bootstrap, "client.id": client_id, "enable.idempotence": True, "acks": "all",
            "linger.ms": 5, **(defaults or {}), **(settings or {}),
            "logger": logging.getLogger("vllm_mm_events.librdkafka")}
    for forced in ("enable.idempotence", "acks"):
        if str(conf[forced]).lower() not in ("true", "all", "-1"):
            raise ValueError(f"kafka.{forced}: delivery must be idempotent with acks=all")
    return conf


class KafkaSink(EventSink):
    """Apache Kafka via librdkafka: idempotent, acks=all, keyed by request_id.

    librdkafka retries transient errors itself; a record that still fails (for example
    after ``message.timeout.ms``, a broker away for longer) is produced again, through an
    outage of any length (``resend_attempts`` None; a number bounds it, then it is reported
    failed). Memory stays bounded by the caller's cap on events in flight.

    With a Schema Registry the schema is registered at start; a registry that does not answer
    then (unreachable, 5xx) does not stop the engine: events wait here (and in the caller's
    outbox) and registration is retried with backoff from ``poll``. A registry that refuses
    (401/403, an incompatible schema) is a configuration error and fails the start.
    """

    REGISTRY_RETRY_MAX_S = 10.0

    resend_attempts: int | None = None

    def __init__(self, bootstrap: str, topic: str, codec: AvroCodec, settings: Mapping[str, Any] | None = None,
                 registry_url: str | None = None, registry_settings: Mapping[str, Any] | None = None,
                 topic_partitions: int = 0):
        from confluent_kafka import Producer

        self.topic = topic
        self.codec = codec
        conf = producer_config(bootstrap, "vllm-mm-events", settings,
                               {"compression.type": "lz4", "message.timeout.ms": 120000})
        if topic_partitions:
            self._ensure_topic(conf, topic, topic_partitions)
        self._producer = Producer(conf)
        self.resends = 0
        self._closed = False
        self._registry = None
        self._unregistered: list[tuple[Any, Any]] = []  # events waiting for the schema's registration
        self._register_at, self._register_backoff = 0.0, 0.5
        if registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            self._registry = SchemaRegistryClient.new_client({"url": registry_url, **(registry_settings or {})})
            self._registered(first=True)

    def _registered(self, first: bool = False) -> bool:
        """Whether the schema has its registry id; tries to register when due."""
        if self._registry is None or self.codec.schema_id is not None:
            return True
        if time.monotonic() < self._register_at:
            return False
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            self.codec.use_registry(self._registry, f"{self.topic}-value")
        except SchemaRegistryError as e:
            if e.http_status_code < 500:
                raise  # refused (auth, an incompatible schema): an operator must act
            self._registry_unavailable(e, first)
            return False
        except Exception as e:  # noqa: BLE001 - unreachable: retried, events wait meanwhile
            self._registry_unavailable(e, first)
            return False
        log.info("schema registered as id %d under %s-value", self.codec.schema_id, self.topic)
        return True

    def _registry_unavailable(self, e: Exception, first: bool) -> None:
        log.warning("schema registry unavailable (%s); %s, retrying in %.1f s", type(e).__name__,
                    "starting anyway: events wait for it" if first else f"{len(self._unregistered)} event(s) wait",
                    self._register_backoff)
        self._register_at = time.monotonic() + self._register_backoff
        self._register_backoff = min(self._register_backoff * 2, self.REGISTRY_RETRY_MAX_S)

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
        if not self._registered():
            self._unregistered.append((event, on_done))
            return
        value = self.codec.encode(event)
        headers = cloudevent_headers(event, self.codec.content_type)
        key = event["request_id"].encode()

        def delivered(err, _msg):
            if self._closed:
                return  # purged at close: the record stays in the caller's outbox, never reported failed
            if err is None:
                on_done(None)
            elif self.resend_attempts is None or _attempt < self.resend_attempts:
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
        if self._unregistered and self._registered():
            waiting, self._unregistered = self._unregistered, []
            for event, on_done in waiting:
                self.publish(event, on_done)
        self._producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self._unregistered and time.monotonic() < deadline:
            self.poll(min(0.1, max(0.0, deadline - time.monotonic())))
        return len(self._unregistered) + self._producer.flush(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Drop what is still queued (it is in the caller's outbox) so that closing never waits on a
        broker that is away; nothing is re-produced from here on."""
        self._closed = True
        self._unregistered.clear()
        self._producer.purge()
        self._producer.flush(0)
