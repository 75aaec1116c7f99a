"""LanceDB: ``lancedb:///abs/dir/table``.

Upserts are ``merge_insert`` on ``id``; each commits a new table version. Multi-vectors
(pooling=none) are a list-of-vectors column, searched with MaxSim. Small frequent commits
leave many fragments, so the table is compacted every ``OPTIMIZE_EVERY`` upserts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from consumers.errors import Transient
from consumers.sinks.base import Hit, VectorSink, split_collection
from consumers.vectors import Point

OPTIMIZE_EVERY = 200
_STR_FIELDS = ("request_id", "event_id", "mm_hash", "modality", "model", "uri", "pooling")


def _io_error(e: Exception) -> bool:
    """A full or read-only disk: Lance reports its I/O failures as ``RuntimeError("lance error: LanceError(IO):
    ...")``, not as OSError. The store's state, not the data (other RuntimeErrors are not)."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and "LanceError(IO)" in str(e))


class LanceDBSink(VectorSink):
    scheme = "lancedb"
    supports_multivector = True

    def __init__(self, uri: str, distance: str = "cosine"):
        super().__init__(uri, distance)
        import lancedb

        self.parent, self.table_name = split_collection(uri)
        self.db = lancedb.connect(self.parent)
        self._table = None
        self._upserts = 0

    def _open(self):
        if self._table is None:
            self._table = self.db.open_table(self.table_name)
        return self._table

    def _schema(self, dim: int, multivector: bool):
        import pyarrow as pa

        vec = pa.list_(pa.float32(), dim)
        fields = [pa.field("id", pa.string(), nullable=False),
                  pa.field("vector", pa.list_(vec) if multivector else vec, nullable=False)]
        fields += [pa.field(f, pa.string()) for f in _STR_FIELDS]
        fields += [pa.field("item_index", pa.int32()), pa.field("event_time", pa.int64()),
                   pa.field("metadata", pa.string())]  # JSON text: maps do not round-trip through Lance
        return pa.schema(fields)

    def describe(self) -> tuple[int, bool] | None:
        import pyarrow as pa

        try:
            t = self._open().schema.field("vector").type
        except ValueError:  # lancedb: "Table '<name>' was not found"
            return None
        except (OSError, RuntimeError) as e:
            if _io_error(e):
                raise Transient("sink", f"{self.name}: {e}") from None
            raise
        if pa.types.is_fixed_size_list(t):
            return int(t.list_size), False
        return int(t.value_type.list_size), True

    def create(self, dim: int, multivector: bool) -> None:
        # Two processes creating the table at once both write it: the second commit is an Overwrite,
        # which can drop rows the first one's owner already wrote and fails that owner's next upsert
        # ("incompatible with concurrent transaction Overwrite"). Creators take turns on a lock file;
        # the one that waited opens the table the first one made (exist_ok).
        import fcntl

        try:
            os.makedirs(self.parent, exist_ok=True)
            with open(os.path.join(self.parent, f".{self.table_name}.create.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._table = self.db.create_table(self.table_name, schema=self._schema(dim, multivector),
                                                   exist_ok=True)
        except (OSError, RuntimeError) as e:
            if _io_error(e):
                raise Transient("sink", f"{self.name}: {e}") from None
            raise

    def upsert(self, points: list[Point]) -> None:
        import pyarrow as pa

        # merge_insert inserts every source row whose id is not in the table yet, a repeated one too (a
        # redelivered event in the batch of its original): keep the last of each id, as the other stores do.
        last = {p.id: i for i, p in enumerate(points)}
        points = [p for i, p in enumerate(points) if last[p.id] == i]
        try:
            t = self._open()
        except ValueError as e:  # "Table '<name>' was not found": dropped, and our handle was let go
            self.collection_gone(e)
        rows = {"id": [p.id for p in points],
                "vector": [p.vector.tolist() for p in points],
                "item_index": [p.payload["item_index"] for p in points],
                "event_time": [p.payload["event_time"] for p in points],
                "metadata": [json.dumps(p.payload["metadata"], sort_keys=True) for p in points]}
        for f in _STR_FIELDS:
            rows[f] = [p.payload[f] for p in points]
        schema = t.schema
        data = pa.table({f.name: pa.array(rows[f.name], type=f.type) for f in schema}, schema=schema)
        try:
            t.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        except (OSError, RuntimeError) as e:
            if _io_error(e):  # a full or read-only disk: the store's state, not the data
                raise Transient("sink", f"{self.name}: {e}") from None
            if "Not found" in str(e):  # the table's files are gone: dropped while in use
                self._table = None  # the handle still shows the version it opened
                self.collection_gone(e)
            raise
        self._upserts += 1
        if self._upserts % OPTIMIZE_EVERY == 0:
            t.optimize()

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        metric = {"cosine": "cosine", "dot": "dot", "l2": "l2"}[self.distance]
        q = self._open().search(vector.tolist(), vector_column_name="vector").distance_type(metric).limit(k)
        hits = []
        for row in q.to_list():
            d = float(row.pop("_distance"))
            row.pop("vector", None)
            score = 1.0 - d if metric == "cosine" else -d  # Lance reports distances (dot: 1 - ip)
            hits.append(Hit(row.pop("id"), score, self._payload(row)))
        return hits

    @staticmethod
    def _payload(row: dict) -> dict[str, Any]:
        p = {k: row.get(k) for k in (*_STR_FIELDS, "item_index", "event_time")}
        p["metadata"] = json.loads(row.get("metadata") or "{}")
        return p

    def count(self) -> int:
        return int(self._open().count_rows())

    def retrieve(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
        rows = self._open().search().where(f"id IN ({quoted})").limit(len(ids)).to_list()
        return {r["id"]: self._payload(r) for r in rows}
