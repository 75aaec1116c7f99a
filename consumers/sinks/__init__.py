"""Vector stores behind one interface (``base.VectorSink``): ``qdrant``, ``pgvector``, ``milvus``,
``lancedb``. ``open_vector_sink`` is the one place a backend is chosen; each is imported only when used.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from consumers.sinks.base import PAYLOAD_FIELDS, DimensionMismatch, Hit, SinkConfigError, VectorSink

__all__ = ["VectorSink", "Hit", "DimensionMismatch", "SinkConfigError", "open_vector_sink", "PAYLOAD_FIELDS"]


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
