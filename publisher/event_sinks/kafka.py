"""Apache Kafka event sink (librdkafka), and the one producer setup the product uses."""

from __future__ import annotations

import logging
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
    """

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
        if registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            codec.use_registry(SchemaRegistryClient.new_client({"url": registry_url, **(registry_settings or {})}),
                               f"{topic}-value")
        self._producer = Producer(conf)
        self.resends = 0
        self._closed = False

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
        self._producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        return self._producer.flush(timeout)

    def close(self) -> None:
        """Drop what is still queued (it is in the caller's outbox) so that closing never waits on a
        broker that is away; nothing is re-produced from here on."""
        self._closed = True
        self._producer.purge()
        self._producer.flush(0)
