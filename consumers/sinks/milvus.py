"""Milvus: ``milvus://host:port/collection`` (server; token from ``MILVUS_TOKEN``) or
``milvus:///abs/file.db/collection`` (Milvus Lite, embedded).

Collections are created with Strong consistency, so a search sees every acknowledged
upsert; an acknowledged upsert is in Milvus's write-ahead log. Milvus has no multi-vector
field for MaxSim search, so pooling=none is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from consumers.errors import Transient
from consumers.sinks.base import PAYLOAD_FIELDS, Hit, VectorSink, split_collection
from consumers.vectors import Point

_METRIC = {"cosine": "COSINE", "dot": "IP", "l2": "L2"}


class MilvusSink(VectorSink):
    scheme = "milvus"

    def __init__(self, uri: str, distance: str = "cosine"):
        super().__init__(uri, distance)
        from pymilvus import MilvusClient

        u = urlsplit(uri)
        parent, self.collection = split_collection(uri)
        if u.netloc:
            target = f"http://{u.hostname}:{u.port or 19530}"
        else:
            target = parent  # a Milvus Lite database file
        try:
            self.client = MilvusClient(uri=target, token=os.environ.get("MILVUS_TOKEN", ""))
        except Exception as e:  # noqa: BLE001 - pymilvus raises MilvusException for unreachable servers
            raise Transient("sink", f"{self.name}: cannot connect: {e}") from None
        # A collection made by another process (or before a restart) is "released": load it
        # so search, get and count work.
        if self._call(self.client.has_collection, self.collection):
            # No deadline: pymilvus also waits for the loading with it, and a large collection takes long.
            self._call(self.client.load_collection, self.collection, timeout=None)

    # pymilvus passes no deadline to its gRPC calls unless given one: a server that accepts and never
    # answers held a call for 70 s (then "unavailable", through its retries). As the Qdrant client's.
    OP_TIMEOUT_S = 30.0

    def _call(self, fn, *args, **kwargs):
        import grpc
        from pymilvus.exceptions import MilvusException, MilvusUnavailableException

        kwargs.setdefault("timeout", self.OP_TIMEOUT_S)
        try:
            return fn(*args, **kwargs)
        except MilvusUnavailableException as e:
            raise Transient("sink", f"{self.name}: {e}") from None
        except grpc.RpcError as e:  # a deadline exceeded comes through pymilvus as gRPC raised it
            if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise Transient("sink", f"{self.name}: {e.code().name}: no answer in time") from None
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise Transient("sink", f"{self.name}: {e.code().name}") from None  # the client refused, not the data
            raise
        except MilvusException as e:
            if any(w in str(e).lower() for w in ("unavailable", "deadline", "timeout", "permission", "privilege",
                                                 "unauthenticated")):
                raise Transient("sink", f"{self.name}: {e}") from None
            raise

    def describe(self) -> tuple[int, bool] | None:
        if not self._call(self.client.has_collection, self.collection):
            return None
        desc = self._call(self.client.describe_collection, self.collection)
        for f in desc["fields"]:
            if f["name"] == "vector":
                return int(f["params"]["dim"]), False
        raise ValueError(f"{self.name}: the collection has no 'vector' field; it was not made by this consumer")

    def create(self, dim: int, multivector: bool) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=36)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        for name in ("request_id", "event_id", "mm_hash", "model", "uri"):
            schema.add_field(name, DataType.VARCHAR, max_length=4096)
        schema.add_field("modality", DataType.VARCHAR, max_length=64)
        schema.add_field("pooling", DataType.VARCHAR, max_length=16)
        schema.add_field("item_index", DataType.INT64)
        schema.add_field("event_time", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type="AUTOINDEX", metric_type=_METRIC[self.distance])
        self._call(self.client.create_collection, self.collection, schema=schema, index_params=index,
                   consistency_level="Strong")

    def upsert(self, points: list[Point]) -> None:
        rows = [{"id": p.id, "vector": p.vector.tolist(), **{k: p.payload[k] for k in PAYLOAD_FIELDS}} for p in points]
        from pymilvus.exceptions import ErrorCode, MilvusException

        try:
            self._call(self.client.upsert, self.collection, data=rows)
        except MilvusException as e:  # dropped while in use: "collection '<name>' does not exist" (code 100)
            if e.code == ErrorCode.COLLECTION_NOT_FOUND:
                self.collection_gone(e)
            raise

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        res = self._call(self.client.search, self.collection, data=[vector.tolist()], limit=k,
                         output_fields=list(PAYLOAD_FIELDS), search_params={"metric_type": _METRIC[self.distance]})
        hits = []
        for h in res[0]:
            entity = h.get("entity", {})
            score = float(h["distance"])  # COSINE/IP: similarity; L2: squared distance
            hits.append(Hit(str(h["id"]), -score if self.distance == "l2" else score, self._payload(entity)))
        return hits

    @staticmethod
    def _payload(entity: dict) -> dict[str, Any]:
        p = {k: entity.get(k) for k in PAYLOAD_FIELDS}
        if isinstance(p["metadata"], str):
            p["metadata"] = json.loads(p["metadata"])
        return p

    def count(self) -> int:
        res = self._call(self.client.query, self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def retrieve(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        res = self._call(self.client.get, self.collection, ids=list(ids), output_fields=list(PAYLOAD_FIELDS))
        return {str(r["id"]): self._payload(r) for r in res}

    def close(self) -> None:
        self.client.close()
