"""Dead letters: records that can never be indexed, kept with the reason and where they came from.

Kafka: the original key, value and headers, plus ``dlq.*`` headers (reason, error, source
topic/partition/offset/timestamp, consumer group, time). File: one JSON object per line
with the same fields and the value in base64. Either way ``flush()`` makes them durable
before the source position moves past them, so a poison record is never just dropped.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import unquote, urlsplit

from consumers.errors import Transient
from publisher.event_sinks.kafka import producer_config

log = logging.getLogger("vllm_mm_events.consumer")


def dlq_headers(kind: str, message: str, coords: dict[str, str], group: str) -> list[tuple[str, bytes]]:
    h = {"dlq.reason": kind, "dlq.error": message[:4000], "dlq.consumer.group": group,
         "dlq.time": str(int(time.time() * 1000))}
    h.update({f"dlq.source.{k}": v for k, v in coords.items()})
    return [(k, v.encode()) for k, v in h.items()]


class DeadLetters(ABC):
    """Where poison records go. Contract (``tests/contract/test_dead_letters.py``): ``send`` keeps a
    record with its reason, error and source coordinates; once ``flush`` returns they are durable
    (or it raises ``Transient``). Usable as a context manager (closes on exit)."""

    @abstractmethod
    def send(self, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]], kind: str, message: str,
             coords: dict[str, str]) -> None:
        """Queue one record: its original bytes, key and headers, why (``kind``, ``message``), from where."""

    def flush(self) -> None:
        """Make everything sent durable; ``Transient`` if that failed (the caller retries)."""

    def close(self) -> None:
        """Deliver what is pending (bounded) and release the client."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KafkaDeadLetters(DeadLetters):
    def __init__(self, uri: str, group: str, settings: dict):
        from confluent_kafka import Producer

        u = urlsplit(uri)
        self.topic = u.path.lstrip("/")
        self.group = group
        self.producer = Producer(producer_config(u.netloc, f"vllm-mm-events-dlq-{os.getpid()}", settings))
        self._errors: list[str] = []

    def _done(self, err, _msg) -> None:
        if err is not None:
            self._errors.append(str(err))

    def send(self, value, key, headers, kind, message, coords) -> None:
        self.producer.produce(self.topic, value=value, key=key,
                              headers=list(headers) + dlq_headers(kind, message, coords, self.group),
                              on_delivery=self._done)
        self.producer.poll(0)

    def flush(self) -> None:
        left = self.producer.flush(30)
        if left or self._errors:
            errors, self._errors = self._errors, []
            raise Transient("dlq", f"dead-letter topic {self.topic}: {left} undelivered; {'; '.join(errors[:3])}")

    def close(self) -> None:
        self.producer.flush(10)


class FileDeadLetters(DeadLetters):
    def __init__(self, path: str | os.PathLike, group: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.group = group
        self._lines: list[str] = []

    def send(self, value, key, headers, kind, message, coords) -> None:
        self._lines.append(json.dumps({
            "reason": kind, "error": message, "source": coords, "consumer_group": self.group,
            "time_ms": int(time.time() * 1000), "value_b64": base64.b64encode(value).decode(),
            "headers": {k: v.decode(errors="replace") for k, v in headers}}) + "\n")

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        with open(self.path, "a") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())


class LoggedDeadLetters(DeadLetters):
    """``--dlq none``: poison records are logged and skipped (the operator chose to lose them)."""

    def send(self, value, key, headers, kind, message, coords) -> None:
        log.error("dropping poison record (no dead-letter queue): %s: %s at %s", kind, message, coords)


def open_dead_letters(dlq: str | None, source: str, group: str, kafka: dict) -> DeadLetters:
    """Default: ``<topic>.dlq`` on the source's brokers, or ``<events log>.dlq.jsonl`` beside the log."""
    if dlq == "none":
        return LoggedDeadLetters()
    if dlq is None:
        u = urlsplit(source)
        dlq = f"{source}.dlq" if u.scheme == "kafka" else f"{source}.dlq.jsonl"
    u = urlsplit(dlq)
    if u.scheme == "kafka":
        return KafkaDeadLetters(dlq, group, kafka)
    return FileDeadLetters(unquote(u.path), group)
