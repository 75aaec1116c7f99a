"""The event sink interface: where ``MMEmbeddingEvent`` records go.

Contract (``tests/contract/test_event_sink.py`` runs it against every backend):
- ``publish(event, on_done)`` hands one record over; ``on_done(err)`` is called exactly
  once, from ``poll``/``flush``, when the record is durable (err None) or finally failed.
- ``poll(timeout)`` serves callbacks; ``flush(timeout)`` waits for everything handed over
  and returns how many records are still undelivered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping

DoneCallback = Callable[[Exception | None], None]


class RecordRefused(Exception):
    """What ``on_done`` gets for a record the sink will never take as it is (the broker's size limit): a
    caller with an outbox drops it there, since every replay would be refused alike. Any other error
    leaves the record to be sent again at the next start."""


class EventSink(ABC):
    """Usable as a context manager (closes on exit)."""

    resends: int = 0  # records produced again after a failed delivery attempt (a sink that re-sends counts them)

    @abstractmethod
    def publish(self, event: Mapping[str, Any], on_done: DoneCallback) -> None:
        """Hand one event record over; ``on_done`` reports its fate later, exactly once."""

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery callbacks (waiting up to ``timeout`` for one)."""

    @abstractmethod
    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` for everything handed over; returns how many are still undelivered."""

    def close(self) -> None:
        """Release the client; call ``flush`` first to deliver what is pending."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
