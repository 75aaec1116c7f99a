"""Vector stores the consumer indexes into, behind one small contract.

Contract (tests/contract/test_vector_sink.py runs it against every backend):
- ``ensure(dim, multivector)`` creates a missing collection/table with that dimension and
  the configured distance, or checks an existing one and returns its dimension.
- ``upsert(points)`` is idempotent (by point id) and durable when it returns: the consumer
  commits source offsets only after it. Retryable failures raise ``Transient``.
- ``search(vector, k)`` returns hits, nearest first, ``score`` higher = nearer.
- ``count()`` and ``retrieve(ids)`` exist so users and tests can check what is there.

Secrets never go in the URI: PGPASSWORD (libpq), QDRANT_API_KEY, MILVUS_TOKEN.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from consumers.embeddings import Point, Transient

PAYLOAD_FIELDS = ("request_id", "event_id", "item_index", "mm_hash", "modality", "model", "uri", "event_time",
                  "pooling", "metadata")


class SinkConfigError(ValueError):
    """The sink cannot serve this configuration (e.g. multi-vectors where none exist)."""


class DimensionMismatch(ValueError):
    pass


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


class VectorSink(ABC):
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
            self.create(dim, multivector)
            existing = (dim, multivector)
        self.dim, self.multivector = existing
        if self.multivector != multivector:
            kind = "multi-vectors" if self.multivector else "single vectors"
            raise SinkConfigError(f"{self.name} already holds {kind}; pooling={'none' if multivector else 'pooled'} "
                                  "does not fit it: use another collection")
        return self.dim

    def check_dimension(self, vector: np.ndarray) -> None:
        got = int(vector.shape[-1])
        if self.dim is not None and got != self.dim:
            raise DimensionMismatch(f"{self.name} holds {self.dim}-d vectors; this embedding is {got}-d")

    @abstractmethod
    def describe(self) -> tuple[int, bool] | None:
        """(dimension, multivector) of an existing collection, or None."""

    @abstractmethod
    def create(self, dim: int, multivector: bool) -> None: ...

    @abstractmethod
    def upsert(self, points: list[Point]) -> None: ...

    @abstractmethod
    def search(self, vector: np.ndarray, k: int) -> list[Hit]: ...

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def retrieve(self, ids: list[str]) -> dict[str, dict[str, Any]]: ...

    def close(self) -> None:
        pass


def split_collection(uri: str) -> tuple[str, str]:
    """``scheme:///a/b/c`` -> ("/a/b", "c"); ``scheme://host:port/c`` -> ("", "c")."""
    path = unquote(urlsplit(uri).path).rstrip("/")
    parent, _, name = path.rpartition("/")
    return parent, name


def open_vector_sink(uri: str, distance: str = "cosine") -> VectorSink:
    """The one place a backend is chosen; each is imported only when used."""
    scheme = urlsplit(uri).scheme
    if scheme == "qdrant":
        from consumers.sinks.qdrant import QdrantSink as cls
    elif scheme == "pgvector":
        from consumers.sinks.pgvector import PgvectorSink as cls
    elif scheme == "milvus":
        from consumers.sinks.milvus import MilvusSink as cls
    elif scheme == "lancedb":
        from consumers.sinks.lancedb import LanceDBSink as cls
    else:
        raise SinkConfigError(f"sink: unknown scheme {scheme!r}; expected qdrant, pgvector, milvus or lancedb")
    return cls(uri, distance)


__all__ = ["VectorSink", "Hit", "Point", "Transient", "DimensionMismatch", "SinkConfigError", "open_vector_sink",
           "PAYLOAD_FIELDS"]
