"""The event source interface: where events come from, and how far they are committed.

Contract (``tests/contract/test_event_source.py`` runs it against every backend):
- ``poll(max_records, timeout)`` hands out up to ``max_records`` ``SourceRecord``s, waiting
  up to ``timeout`` for the first;
- ``commit(records)`` records them as done, once they are durably indexed (or
  dead-lettered): at-least-once, the position never runs ahead of the sinks. A new reader
  of the same group resumes after the last committed record;
- ``caught_up()`` is True once everything that existed has been handed out (``--once``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable


class SourceUnreadable(ValueError):
    """The source cannot be read as it is: not an event log, a writer schema refused, a log replaced under
    the reader. The consumer stops and says why (nothing is committed past what was indexed); a restart
    reads what is there then."""


class SourceNotFound(Exception):
    """The source names something that is not there (a Kafka topic); the message says what and where."""


@dataclass
class SourceRecord:
    value: bytes  # the record's bytes as they came (Kafka value; for the file log, the block's bytes)
    coords: dict[str, str]  # where it came from, for dead letters and logs
    position: Any  # what commit() needs
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    event: dict | None = None  # already decoded (the file log holds records, not framed values)
    error: str | None = None  # could not be read as a record (a file log's block; a Kafka record's headers)


class EventSource(ABC):
    """Usable as a context manager (closes on exit)."""

    # Called by the source, from poll(), before partitions are taken away, so the caller can
    # finish and commit what it holds of them. Gets the revoked (topic, partition) pairs.
    before_revoke: Callable[[set], None] | None = None

    @abstractmethod
    def poll(self, max_records: int, timeout: float) -> list[SourceRecord]:
        """Up to ``max_records`` records, waiting up to ``timeout`` seconds for the first."""

    @abstractmethod
    def commit(self, records: list[SourceRecord]) -> None:
        """Mark ``records`` (and everything before them on their partition) as done, durably; a source
        whose server may not answer (Kafka) never holds the caller for it: the commit lands later, and
        records whose commit never lands are read again (upserts are idempotent)."""

    def pause(self) -> None:
        """Stop fetching (a slow sink) while still being polled, so group membership stays alive."""

    def resume(self) -> None:
        """Fetch again after ``pause``."""

    @abstractmethod
    def caught_up(self) -> bool:
        """True once everything that existed is consumed (what --once waits for)."""

    def lag(self) -> int | None:
        """Records not yet handed out, where the source can tell (None: unknown)."""
        return None

    def owns(self, record: SourceRecord) -> bool:
        """False once the record's partition was taken away by a rebalance."""
        return True

    def close(self) -> None:
        """Leave the group / release the file."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
