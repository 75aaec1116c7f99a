"""Qdrant: ``qdrant://host:port/collection`` (server, REST) or ``qdrant:///abs/dir/collection`` (local mode).

Multi-vectors (pooling=none) use Qdrant's multivector config with MaxSim. Upserts wait for
the write to be applied (``wait=True``), so a returned upsert is in Qdrant's WAL.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from consumers.errors import Transient
from consumers.sinks.base import Hit, VectorSink, split_collection
from consumers.vectors import Point


class QdrantSink(VectorSink):
    scheme = "qdrant"
    supports_multivector = True

    def __init__(self, uri: str, distance: str = "cosine"):
        super().__init__(uri, distance)
        from qdrant_client import QdrantClient, models

        self.m = models
        u = urlsplit(uri)
        parent, self.collection = split_collection(uri)
        if u.netloc:
            self.local = False
            self.client = QdrantClient(host=u.hostname, port=u.port or 6333, api_key=os.environ.get("QDRANT_API_KEY"),
                                       https=os.environ.get("QDRANT_HTTPS", "").lower() in ("1", "true"), timeout=30)
        else:
            self.local = True
            self.client = QdrantClient(path=parent)
        self._distance = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT,
                          "l2": models.Distance.EUCLID}[distance]

    def _call(self, fn, *args, **kwargs):
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            return fn(*args, **kwargs)
        except ResponseHandlingException as e:  # connection refused, timeouts
            raise Transient("sink", f"{self.name}: {e}") from None
        except UnexpectedResponse as e:
            # 401/403: the API key is wrong or lacks the right; 404: the collection is gone. The store
            # refuses this client, not the data: retried (counted), never dead-lettered.
            if e.status_code in (401, 403, 404, 429, 500, 502, 503, 504):
                raise Transient("sink", f"{self.name}: HTTP {e.status_code}") from None
            raise

    def describe(self) -> tuple[int, bool] | None:
        if not self._call(self.client.collection_exists, self.collection):
            return None
        params = self._call(self.client.get_collection, self.collection).config.params.vectors
        return int(params.size), params.multivector_config is not None

    def create(self, dim: int, multivector: bool) -> None:
        m = self.m
        mv = m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM) if multivector else None
        self._call(self.client.create_collection, self.collection,
                   vectors_config=m.VectorParams(size=dim, distance=self._distance, multivector_config=mv))
        if not self.local:  # local mode has no payload indexes; servers filter faster with them
            for field in ("request_id", "mm_hash", "modality", "model"):
                self._call(self.client.create_payload_index, self.collection, field, m.PayloadSchemaType.KEYWORD)

    def upsert(self, points: list[Point]) -> None:
        structs = [self.m.PointStruct(id=p.id, vector=p.vector.tolist(), payload=p.payload) for p in points]
        try:
            self._call(self.client.upsert, self.collection, points=structs, wait=True)
        except (ValueError, Transient) as e:
            # Dropped while in use: local mode says ValueError("Collection <name> not found"), a server 404.
            if str(e) == f"Collection {self.collection} not found" or str(e).endswith(": HTTP 404"):
                self.collection_gone(e)
            raise

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        res = self._call(self.client.query_points, self.collection, query=vector.tolist(), limit=k, with_payload=True)
        sign = -1.0 if self.distance == "l2" else 1.0  # Qdrant reports Euclid as a distance
        return [Hit(str(p.id), sign * float(p.score), dict(p.payload or {})) for p in res.points]

    def count(self) -> int:
        return int(self._call(self.client.count, self.collection, exact=True).count)

    def retrieve(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        got = self._call(self.client.retrieve, self.collection, ids=list(ids), with_payload=True)
        return {str(p.id): dict(p.payload or {}) for p in got}

    def close(self) -> None:
        self.client.close()
