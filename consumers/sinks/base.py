"""Vector stores the consumer indexes into, behind one small contract.

Contract (tests/contract/test_vector_sink.py runs it against every backend):
- ``ensure(dim, multivector)`` creates a missing collection/table with that dimension and
  the configured distance, or checks an existing one and returns its dimension.
- ``upsert(points)`` is idempotent (by point id) and durable when it returns: the consumer
  commits source offsets only after it. Retryable failures raise ``consumers.errors.Transient``.
  An id named twice in one upsert leaves one point, the last given. A collection dropped after
  ``ensure()`` is made again by the next upsert, which raises Transient (``collection_gone``).
- ``search(vector, k)`` returns hits, nearest first, ``score`` higher = nearer.
- ``count()`` and ``retrieve(ids)`` exist so users and tests can check what is there.

Secrets never go in the URI: PGPASSWORD (libpq), QDRANT_API_KEY, MILVUS_TOKEN.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import numpy as np

from consumers.errors import Transient
from consumers.vectors import PAYLOAD_FIELDS, Point

__all__ = ["VectorSink", "Hit", "Point", "DimensionMismatch", "SinkConfigError", "PAYLOAD_FIELDS",
           "split_collection"]

log = logging.getLogger("vllm_mm_events.consumer")


class SinkConfigError(ValueError):
    """The sink cannot serve this configuration (e.g. multi-vectors where none exist)."""


class DimensionMismatch(ValueError):
    """An embedding whose dimension does not fit the existing collection (the record is poison)."""


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


class VectorSink(ABC):
    """One collection/table of one store. Usable as a context manager (closes on exit)."""

    scheme: str = ""
    supports_multivector = False

    def __init__(self, uri: str, distance: str = "cosine"):
        self.uri = uri
        self.distance = distance
        self.dim: int | None = None
        self.multivector = False

    @property
    def name(self) -> str:
        u = urlsplit(self.uri)
        return f"{u.scheme}://{u.hostname or ''}{':' + str(u.port) if u.port else ''}{u.path}"

    def ensure(self, dim: int, multivector: bool) -> int:
        """Create the collection if missing; return its dimension (which may differ from ``dim``)."""
        if multivector and not self.supports_multivector:
            raise SinkConfigError(f"{self.scheme}:// cannot store multi-vectors (pooling=none); "
                                  "use --pooling mean, first or max, or a qdrant:// or lancedb:// sink")
        existing = self.describe()
        if existing is None:
            try:
                self.create(dim, multivector)
                existing = (dim, multivector)
            except Exception:
                # Another consumer of the group may have created it between describe() and create():
                # theirs is the collection (its dimension rules); any other failure is raised as it was.
                existing = self.describe()
                if existing is None:
                    raise
        self.dim, self.multivector = existing
        if self.multivector != multivector:
            kind = "multi-vectors" if self.multivector else "single vectors"
            raise SinkConfigError(f"{self.name} already holds {kind}; pooling={'none' if multivector else 'pooled'} "
                                  "does not fit it: use another collection")
        return self.dim

    def collection_gone(self, error: Exception) -> NoReturn:
        """Call from ``upsert`` on the store's "no such collection" error; always raises ``Transient``.

        The collection was dropped after ``ensure()`` (an operator rebuilding the index): it is made again
        as a fresh start would (this sink's dimension, multivector and distance), so the consumer's retry
        of the write lands. Never the data's fault: every later event would be dead-lettered alike."""
        if self.dim is not None and self.describe() is None:
            log.warning("sink %s: the collection is gone (dropped while in use?); creating it again, %d-d %s",
                        self.name, self.dim, "multi-vectors" if self.multivector else "vectors")
            try:
                self.ensure(self.dim, self.multivector)
            except Transient:
                raise
            except Exception as e:  # noqa: BLE001 - still the store's state, not the data: retried
                raise Transient("sink", f"{self.name}: the collection is gone and creating it again failed: "
                                        f"{type(e).__name__}: {e}") from None
            raise Transient("sink", f"{self.name}: the collection was gone ({error}); created it again") from None
        raise Transient("sink", f"{self.name}: {error}") from None

    def check_dimension(self, vector: np.ndarray) -> None:
        got = int(vector.shape[-1])
        if self.dim is not None and got != self.dim:
            raise DimensionMismatch(f"{self.name} holds {self.dim}-d vectors; this embedding is {got}-d")

    @abstractmethod
    def describe(self) -> tuple[int, bool] | None:
        """(dimension, multivector) of an existing collection, or None."""

    @abstractmethod
    def create(self, dim: int, multivector: bool) -> None:
        """Create the collection with the configured distance (and the store's indexes)."""

    @abstractmethod
    def upsert(self, points: list[Point]) -> None:
        """Insert or replace by point id; durable when it returns."""

    @abstractmethod
    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` nearest points, nearest first (higher score = nearer)."""

    @abstractmethod
    def count(self) -> int:
        """How many points the collection holds."""

    @abstractmethod
    def retrieve(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Payloads of the points among ``ids`` that exist, by id."""

    def close(self) -> None:
        """Release the client."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_collection(uri: str) -> tuple[str, str]:
    """``scheme:///a/b/c`` -> ("/a/b", "c"); ``scheme://host:port/c`` -> ("", "c")."""
    path = unquote(urlsplit(uri).path).rstrip("/")
    parent, _, name = path.rpartition("/")
    return parent, name
