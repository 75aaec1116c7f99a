"""One contract, every vector store: Qdrant (local mode), PostgreSQL + pgvector (a real
server), Milvus Lite and LanceDB. The consumer relies on exactly these properties."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from consumers.sinks import DimensionMismatch, SinkConfigError, open_vector_sink
from consumers.vectors import Point, point_id

DIM = 24


@pytest.fixture(params=["qdrant", "pgvector", "milvus", "lancedb"])
def sink_uri(request, tmp_path):
    """A fresh collection URI per test; `open_vector_sink` on it again is a second client."""
    return _fresh_uri(request.param, request, tmp_path)


def _fresh_uri(kind, request, tmp_path):
    name = "t_" + uuid.uuid4().hex[:10]
    if kind == "qdrant":
        return f"qdrant://{tmp_path}/qdrant/{name}"
    if kind == "pgvector":
        pg = request.getfixturevalue("postgres")
        request.getfixturevalue("monkeypatch").setenv("PGPASSWORD", pg.env["PGPASSWORD"])
        return pg.uri(name)
    if kind == "milvus":
        return f"milvus://{tmp_path}/milvus.db/{name}"
    return f"lancedb://{tmp_path}/lance/{name}"


@pytest.fixture(params=["pgvector", "lancedb"])
def shared_sink_uri(request, tmp_path):
    """A fresh collection in a store that several processes may write at once (Qdrant local mode and
    Milvus Lite hold their files for one client; their servers are the multi-writer deployments)."""
    return _fresh_uri(request.param, request, tmp_path)


def make_points(n: int, dim: int = DIM, seed: int = 0, multi: bool = False) -> list[Point]:
    rng = np.random.default_rng(seed)
    pts = []
    for i in range(n):
        v = rng.standard_normal((3 + i % 2, dim) if multi else dim).astype(np.float32)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        eid = f"evt-{seed}-{i}"
        pts.append(Point(point_id(eid, 0), v, {
            "request_id": f"req-{i}", "event_id": eid, "item_index": 0, "mm_hash": f"{i:064x}",
            "modality": "image", "model": "tiny/llava", "uri": f"s3://b/k/{i}.safetensors",
            "event_time": 1_764_000_000_000 + i, "pooling": "none" if multi else "mean",
            "metadata": {"tenant": "acme", "i": str(i)}}))
    return pts


def test_create_upsert_search_and_reopen(sink_uri):
    sink = open_vector_sink(sink_uri)
    assert sink.ensure(DIM, multivector=False) == DIM
    pts = make_points(20)
    sink.upsert(pts[:12])
    sink.upsert(pts[8:])  # overlapping batch: upserts are idempotent by id
    assert sink.count() == 20
    hits = sink.search(pts[5].vector, k=5)
    assert hits[0].id == pts[5].id and hits[0].payload["request_id"] == "req-5"
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(hits) == 5
    sink.close()
    # A new client (another process, after a restart) sees the same collection and points.
    again = open_vector_sink(sink_uri)
    assert again.describe() == (DIM, False)
    assert again.ensure(DIM, multivector=False) == DIM
    assert again.count() == 20
    got = again.retrieve([pts[3].id, pts[17].id])
    assert got[pts[3].id] == pts[3].payload and got[pts[17].id] == pts[17].payload
    again.close()


def test_upsert_replaces_payload_and_vector(sink_uri):
    sink = open_vector_sink(sink_uri)
    sink.ensure(DIM, multivector=False)
    pts = make_points(6)
    sink.upsert(pts)
    moved = Point(pts[2].id, pts[4].vector.copy(), dict(pts[2].payload, request_id="req-2-replayed"))
    sink.upsert([moved])
    assert sink.count() == 6
    assert sink.retrieve([pts[2].id])[pts[2].id]["request_id"] == "req-2-replayed"
    top2 = {h.id for h in sink.search(pts[4].vector, k=2)}
    assert top2 == {pts[2].id, pts[4].id}
    sink.close()


def test_dimension_is_the_collections(sink_uri):
    sink = open_vector_sink(sink_uri)
    sink.ensure(DIM, multivector=False)
    sink.close()
    other = open_vector_sink(sink_uri)
    assert other.ensure(DIM + 8, multivector=False) == DIM  # an existing collection keeps its dimension
    with pytest.raises(DimensionMismatch, match=f"holds {DIM}-d vectors; this embedding is {DIM + 8}-d"):
        other.check_dimension(np.zeros(DIM + 8, np.float32))
    other.check_dimension(np.zeros(DIM, np.float32))
    other.close()


def test_multivectors_where_supported_refused_elsewhere(sink_uri):
    sink = open_vector_sink(sink_uri)
    if not sink.supports_multivector:
        with pytest.raises(SinkConfigError, match="cannot store multi-vectors.*--pooling mean"):
            sink.ensure(DIM, multivector=True)
        sink.close()
        return
    assert sink.ensure(DIM, multivector=True) == DIM
    pts = make_points(8, multi=True, seed=3)
    sink.upsert(pts)
    assert sink.count() == 8
    hits = sink.search(pts[6].vector, k=3)
    assert hits[0].id == pts[6].id
    sink.close()
    single = open_vector_sink(sink_uri)
    with pytest.raises(SinkConfigError, match="already holds multi-vectors"):
        single.ensure(DIM, multivector=False)
    single.close()


def test_consumers_starting_together_all_get_the_collection(shared_sink_uri):
    """Consumers of one group start at once against a collection none has created: each one's ensure()
    must end with the collection, never with an error a racing creator caused (it would dead-letter a
    batch of good events)."""
    sinks = [open_vector_sink(shared_sink_uri) for _ in range(6)]
    start, results = threading.Barrier(len(sinks)), [None] * len(sinks)

    def ensure(i):
        start.wait()
        try:
            results[i] = sinks[i].ensure(DIM, multivector=False)
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            results[i] = e
    threads = [threading.Thread(target=ensure, args=(i,)) for i in range(len(sinks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [DIM] * len(sinks), results
    pts = make_points(6, seed=9)
    for i, s in enumerate(sinks):
        s.upsert(pts[i:i + 1])
    fresh = open_vector_sink(shared_sink_uri)
    assert fresh.count() == 6
    fresh.close()
    for s in sinks:
        s.close()
