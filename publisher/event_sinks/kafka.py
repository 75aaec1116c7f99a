"""Apache Kafka event sink (librdkafka), and the one producer setup the product uses."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Mapping

from confluent_kafka import KafkaError, KafkaException

from publisher.event_sinks.base import EventSink, RecordRefused
from schemas.cloudevents import cloudevent_headers
from schemas.codec import AvroCodec, registry_client

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
    failed). A record that ``produce()`` itself refuses (a ``KafkaException`` at once: the topic
    unknown while it is deleted and created again, for example) is produced again from ``poll``
    after a backoff (0.5 s doubling to ``RETRY_MAX_S``), counted and bounded the same way. Only
    what would fail on every try raises from ``publish``: an event the codec cannot encode, a
    record over ``message.max.bytes``. Memory stays bounded by the caller's cap on events in flight.

    With a Schema Registry the schema is registered at start, on a thread of its own
    (``_Registration``): the caller's loop never waits on the registry. A registry that does not
    answer within ``REGISTRY_START_WAIT_S`` (unreachable, 5xx, hung) does not stop the engine:
    events wait here (and in the caller's outbox) while the thread retries with backoff. A
    registry that refuses at start (401/403, an incompatible schema) is a configuration error and
    fails the start; one that refuses later is logged as an error and retried, its events kept.
    """

    REGISTRY_START_WAIT_S = 15.0
    RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0  # between tries of records produce() refused

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
        self._deferred: list[tuple[Any, Any, int, KafkaError]] = []  # refused by produce(): tried again from poll
        self._retry_s = self.RETRY_MIN_S
        self._retry_at = 0.0
        self._too_large: deque[tuple[Any, Any, int]] = deque()  # in a batch the broker refused as too large
        self._probing = False  # one of them is in flight alone
        # Published while the schema waits for its registration, or while a batch the broker refused as too
        # large is sorted out (_probe_next): sent from poll once neither holds.
        self._held: list[tuple[Any, Any, int]] = []
        self._registration: _Registration | None = None
        if registry_url:
            self._registration = _Registration(registry_client(registry_url, registry_settings), codec,
                                               f"{topic}-value")
            self._registration.wait_for_start(self.REGISTRY_START_WAIT_S)

    def _registered(self) -> bool:
        """Whether values can be framed: no registry, or the schema has its id."""
        return self._registration is None or self._registration.done.is_set()

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

    def publish(self, event, on_done, _attempt: int = 0, _alone: bool = False):
        if not self._registered() or (not _alone and (self._too_large or self._probing)):
            self._held.append((event, on_done, _attempt))
            return
        value = self.codec.encode(event)
        headers = cloudevent_headers(event, self.codec.content_type)
        key = event["request_id"].encode()

        def delivered(err, _msg):
            if self._closed:
                return  # purged at close: the record stays in the caller's outbox, never reported failed
            if _alone:
                self._probing = False
            if err is None:
                on_done(None)
            elif err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                # Over the topic's max.message.bytes, which the broker applies to a whole batch: the record, or
                # another one batched with it. Each such record is sent again alone (_probe_next); refused
                # alone, it is too large on every try, and the caller drops it (RecordRefused).
                if _alone:
                    on_done(RecordRefused(f"Kafka refused the record: {err.name()}: {err.str()}"))
                else:
                    self.resends += 1
                    self._too_large.append((event, on_done, _attempt))
            elif self._may_resend(_attempt, on_done, "delivery", err):
                log.warning("event %s: delivery failed (%s); producing it again", event["event_id"], err.name())
                self._publish_from_poll(event, on_done, _attempt + 1)

        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=delivered)
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain
            except KafkaException as e:
                # Over message.max.bytes (librdkafka reports it with the broker's code): refused on every try.
                if e.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise
                if _alone:  # tried again with the others refused at produce() (with their backoff)
                    self._probing = False
                if not self._deferred:
                    self._retry_at = time.monotonic() + self._retry_s
                self._deferred.append((event, on_done, _attempt, e.args[0]))  # logged if still refused then
                return

    def _probe_next(self) -> None:
        """Send the records of a batch the broker refused as too large one at a time, truly alone: only
        once nothing else is queued or in flight, and while one is, new records are held (``_held``).
        Then release what was held (also what waited for the schema's registration)."""
        if self._too_large and not self._probing and len(self._producer) == 0:
            event, on_done, attempt = self._too_large.popleft()
            self._probing = True
            self._publish_from_poll(event, on_done, attempt, alone=True)
        if self._held and not self._too_large and not self._probing and self._registered():
            held, self._held = self._held, []
            for event, on_done, attempt in held:
                self._publish_from_poll(event, on_done, attempt)

    def _may_resend(self, attempt: int, on_done, what: str, err) -> bool:
        """Whether ``resend_attempts`` allow another try (counted); if not, report the record failed."""
        if self.resend_attempts is None or attempt < self.resend_attempts:
            self.resends += 1
            return True
        on_done(RuntimeError(f"Kafka {what} failed: {err.name()}: {err.str()}"))
        return False

    def _publish_from_poll(self, event, on_done, attempt: int = 0, alone: bool = False) -> None:
        """``publish`` on ``poll``'s path, where nothing may be raised (it would stop the caller's loop).
        What ``publish`` raises fails on every try (an event the codec refuses, one encoded here for the
        first time after the registry's wait; a record over ``message.max.bytes``): RecordRefused."""
        try:
            self.publish(event, on_done, attempt, alone)
        except Exception as e:  # noqa: BLE001
            if alone:
                self._probing = False
            on_done(RecordRefused(f"{type(e).__name__}: {e}"))

    def _retry_deferred(self) -> None:
        if not self._deferred or time.monotonic() < self._retry_at:
            return
        waiting, self._deferred = self._deferred, []
        for event, on_done, attempt, err in waiting:
            if self._may_resend(attempt, on_done, "produce", err):
                self._publish_from_poll(event, on_done, attempt + 1)
        if self._deferred:  # refused again: wait longer before the next try
            self._retry_s = min(self._retry_s * 2, self.RETRY_MAX_S)
            self._retry_at = time.monotonic() + self._retry_s
            err = self._deferred[0][3]
            log.warning("the producer still refuses %d event(s) (%s: %s); trying again in %.1f s",
                        len(self._deferred), err.name(), err.str(), self._retry_s)
        else:
            self._retry_s = self.RETRY_MIN_S

    def poll(self, timeout: float = 0.0) -> None:
        self._retry_deferred()
        self._probe_next()
        self._producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Also tries refused records again while time is left; they count as undelivered until taken."""
        deadline = time.monotonic() + timeout
        while (self._deferred or self._too_large or self._probing or self._held) and time.monotonic() < deadline:
            self.poll(min(0.1, max(0.0, deadline - time.monotonic())))
        left = self._producer.flush(max(0.0, deadline - time.monotonic()))
        return left + len(self._deferred) + len(self._too_large) + len(self._held)

    def close(self) -> None:
        """Drop what is still queued (it is in the caller's outbox) so that closing never waits on a
        broker that is away; nothing is re-produced from here on."""
        self._closed = True
        if self._registration is not None:
            self._registration.stop()
        self._deferred.clear()  # like the purge: they stay in the caller's outbox
        self._too_large.clear()
        self._held.clear()
        self._producer.purge()
        self._producer.flush(0)


class _Registration:
    """Registers ``codec``'s schema under ``subject`` on a daemon thread, retrying with backoff
    (0.5 s doubling to ``RETRY_MAX_S``) until the registry gives the id; ``done`` is set once the
    codec frames values with it. A 4xx answer is a refusal: before the start has stopped waiting
    it is raised there (``wait_for_start``); later it is logged as an error and retried."""

    RETRY_MAX_S = 10.0

    def __init__(self, client, codec: AvroCodec, subject: str):
        self.done = threading.Event()
        self._client, self._codec, self._subject = client, codec, subject
        self._lock = threading.Lock()
        self._waiting_start = True  # the start waits for the first answer (under _lock)
        self._first_answer = threading.Event()
        self._first_error: Exception | None = None
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="mm-events-registry", daemon=True).start()

    def wait_for_start(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the first answer: raise a refusal, log an outage and go on."""
        self._first_answer.wait(timeout)
        with self._lock:
            self._waiting_start = False
            error = self._first_error
        if self.done.is_set():
            return
        if self._is_refusal(error):
            self.stop()
            raise error
        reason = type(error).__name__ if error is not None else f"no answer in {timeout:.0f} s"
        log.warning("schema registry unavailable (%s); starting anyway: events wait for it", reason)

    def stop(self) -> None:
        self._stopped.set()

    @staticmethod
    def _is_refusal(e: Exception | None) -> bool:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        # auth, an incompatible schema; not a timeout or a rate limit (408, 429), which pass
        return isinstance(e, SchemaRegistryError) and e.http_status_code < 500 and e.http_status_code not in (408, 429)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                self._codec.use_registry(self._client, self._subject)
            except Exception as e:  # noqa: BLE001 - unreachable, hung, 5xx or refused: see below
                with self._lock:
                    at_start = self._waiting_start
                    if at_start:
                        self._first_error = e
                self._first_answer.set()
                if self._is_refusal(e):
                    if at_start:
                        return  # the start raises it
                    log.error("schema registry refused the schema under %s: %s; events wait (spooled), "
                              "retrying in %.0f s", self._subject, e, self.RETRY_MAX_S)
                    backoff = self.RETRY_MAX_S
                elif not at_start:
                    log.warning("schema registry unavailable (%s); retrying in %.1f s", type(e).__name__, backoff)
            else:
                self.done.set()
                self._first_answer.set()
                log.info("schema registered as id %d under %s", self._codec.schema_id, self._subject)
                return
            self._stopped.wait(backoff)
            backoff = min(backoff * 2, self.RETRY_MAX_S)
