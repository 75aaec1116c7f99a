"""Dead letters: records that can never be indexed, kept with the reason and where they came from.

Kafka: the original key, value and headers, plus ``dlq.*`` headers (reason, error, source
topic/partition/offset/timestamp, consumer group, time). File: one JSON object per line
with the same fields: the value and key in base64, the headers as ``[name, base64 value]``
pairs (in order, repeated names kept). Either way ``flush()`` makes them durable before the
source position moves past them, so a poison record is never just dropped.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
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
    """A dead letter refused (its delivery failed, the broker away past ``message.timeout.ms``, the
    local queue full, or a value over the producer's size limit) is kept and produced again by the
    next ``flush``, which raises ``Transient`` until every one is acknowledged: the caller commits
    the source position only after that. Nothing here raises from ``send``."""

    KEPT_VALUE_BYTES = 64 << 10  # of a value too large to dead-letter whole; the source keeps all of it

    def __init__(self, uri: str, group: str, settings: dict):
        from confluent_kafka import Producer

        u = urlsplit(uri)
        self.topic = u.path.lstrip("/")
        self.group = group
        self.producer = Producer(producer_config(u.netloc, f"vllm-mm-events-dlq-{os.getpid()}", settings))
        self._refused: list[tuple[_Letter, str]] = []  # (letter, why): produced again at the next flush

    def send(self, value, key, headers, kind, message, coords) -> None:
        self._produce(_Letter(value or b"", key, list(headers), dlq_headers(kind, message, coords, self.group)))

    def _produce(self, letter: "_Letter") -> None:
        from confluent_kafka import KafkaError, KafkaException

        def refused(err) -> None:
            # Too large (librdkafka's own limit reports it too): shortened if it is large. A small one goes
            # again as it is once (another record of its batch may have been the large one: the broker's
            # limit is per batch), then shorter at each refusal: a dead-letter topic whose max.message.bytes
            # is below KEPT_VALUE_BYTES refused it for good, and the consumer's commits waited for good.
            if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                if letter.size() > self.KEPT_VALUE_BYTES or letter.too_large:
                    letter.shorten(self.KEPT_VALUE_BYTES)
                letter.too_large += 1
            self._refused.append((letter, err.str()))

        def delivered(err, _msg) -> None:
            if err is not None:
                refused(err)

        try:
            self.producer.produce(self.topic, value=letter.value, key=letter.key, headers=letter.headers(),
                                  on_delivery=delivered)
        except BufferError:  # the local queue is full: the broker has been away a while
            self._refused.append((letter, "local queue full"))
        except KafkaException as e:
            refused(e.args[0])
        self.producer.poll(0)

    def flush(self) -> None:
        again, self._refused = self._refused, []
        for letter, _ in again:
            self._produce(letter)
        left = self.producer.flush(30)
        if left or self._refused:
            why = "; ".join(sorted({w for _, w in self._refused})[:3])
            raise Transient("dlq", f"dead-letter topic {self.topic}: {left} undelivered, "
                                   f"{len(self._refused)} refused (to be sent again){': ' + why if why else ''}")

    def close(self) -> None:
        self.producer.flush(10)


@dataclass
class _Letter:
    """A Kafka dead letter: the record's value, key and own headers, the ``dlq.*`` headers this queue adds,
    and, once shortened for the broker, what the original held (kept here: a record's own ``dlq.truncated``
    header is the producer's, never read)."""
    value: bytes
    key: bytes | None
    original: list[tuple[str, bytes | None]]
    ours: list[tuple[str, bytes]]
    too_large: int = 0  # times refused as too large
    sizes: tuple[int, int] | None = None  # once shortened: (the original value's bytes, its headers left out)

    def size(self) -> int:
        return len(self.value) + len(self.key or b"") + sum(len(k) + len(v or b"") for k, v in self.headers())

    def headers(self) -> list[tuple[str, bytes | None]]:
        if self.sizes is None:
            return self.original + self.ours
        note = f"value {self.sizes[0]} bytes (kept {len(self.value)}), {self.sizes[1]} original header(s)"
        return self.ours + [("dlq.truncated", note.encode())]

    def shorten(self, first: int) -> None:
        """The start of the value: ``first`` bytes the first time, half of what is kept each time after;
        with no value left, no key and a short ``dlq.error``. The original headers are left out."""
        if self.sizes is None:
            self.sizes = (len(self.value), len(self.original))
            keep = first if len(self.value) > first else len(self.value) // 2
            self.value, self.key = self.value[:keep], (self.key or b"")[:1024]
        elif self.value:
            self.value = self.value[:len(self.value) // 2]
        else:
            self.key, self.ours = b"", [(k, v[:256] if k == "dlq.error" else v) for k, v in self.ours]


class FileDeadLetters(DeadLetters):
    def __init__(self, path: str | os.PathLike, group: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.group = group
        self._lines: list[str] = []

    def send(self, value, key, headers, kind, message, coords) -> None:
        self._lines.append(json.dumps({
            "reason": kind, "error": message, "source": coords, "consumer_group": self.group,
            "time_ms": int(time.time() * 1000), "value_b64": _b64(value or b""), "key_b64": _b64(key),
            "headers": [[k, _b64(v)] for k, v in headers]}) + "\n")

    def flush(self) -> None:
        """Append the lines whole or not at all: a failed write (disk full) is cut off again, the lines
        are kept for the next flush, and ``Transient`` says so. Under an exclusive lock: consumers sharing
        the file (replicas on one volume, groups of one event log) never cut off each other's lines."""
        if not self._lines:
            return
        data = "".join(self._lines).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)  # copies of events
        except OSError as e:
            raise Transient("dlq", f"dead-letter file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released with the close
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, start)  # no half line for a reader to trip on
                raise Transient("dlq", f"dead-letter file {self.path}: {e.strerror or e}") from None
        finally:
            os.close(fd)
        self._lines.clear()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


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
