"""One contract, every vector store: Qdrant (local mode), PostgreSQL + pgvector (a real
server), Milvus Lite and LanceDB. The consumer relies on exactly these properties."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from consumers.errors import Transient
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


def test_an_id_named_twice_in_one_upsert_is_one_point_the_last(sink_uri):
    """A redelivered event in the same batch as its original: one point, the last one given."""
    sink = open_vector_sink(sink_uri)
    sink.ensure(DIM, multivector=False)
    pts = make_points(4, seed=5)
    again = Point(pts[1].id, pts[3].vector.copy(), dict(pts[1].payload, request_id="req-1-redelivered"))
    sink.upsert([pts[0], pts[1], pts[2], again])  # pts[1]'s id is not in the collection yet
    assert sink.count() == 3
    assert sink.retrieve([pts[1].id])[pts[1].id]["request_id"] == "req-1-redelivered"
    hits = sink.search(pts[3].vector, k=1)  # pts[3] itself was never written: its vector is pts[1]'s now
    assert hits[0].id == pts[1].id and hits[0].score == pytest.approx(1.0, abs=1e-3)
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


def _drop_collection(sink, request) -> None:
    """What an operator rebuilding the index does, with the store's own client or SQL."""
    if sink.scheme == "qdrant":
        sink.client.delete_collection(sink.collection)  # local mode: one client holds the directory
    elif sink.scheme == "milvus":
        sink.client.drop_collection(sink.collection)
    elif sink.scheme == "lancedb":
        import lancedb

        lancedb.connect(sink.parent).drop_table(sink.table_name)
    else:
        import psycopg
        from psycopg import sql

        with psycopg.connect(request.getfixturevalue("postgres").dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP TABLE {t}").format(t=sql.Identifier(sink.table)))


def test_a_collection_dropped_while_in_use_is_made_again(sink_uri, request, caplog):
    """Dropped after ensure(): the next upsert makes it again (as a fresh start would) and asks for a
    retry (Transient), which then lands. Never a data error: that would dead-letter the whole stream."""
    sink = open_vector_sink(sink_uri)
    sink.ensure(DIM, multivector=False)
    sink.upsert(make_points(5))
    _drop_collection(sink, request)
    pts = make_points(3, seed=7)
    with caplog.at_level(logging.WARNING, logger="vllm_mm_events.consumer"):
        with pytest.raises(Transient, match=sink.name):
            sink.upsert(pts)
    warnings = [r for r in caplog.records if r.name == "vllm_mm_events.consumer" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and sink.name in warnings[0].getMessage(), warnings
    sink.upsert(pts)
    assert sink.count() == 3
    assert sink.describe() == (DIM, False)
    hits = sink.search(pts[1].vector, k=1)
    assert hits[0].id == pts[1].id
    sink.close()


_FULL_DISK = r"""
import json, pickle, resource, signal, sys
from consumers.errors import Transient
from consumers.sinks import open_vector_sink

uri, other_uri, points_file = sys.argv[1:]
points = pickle.load(open(points_file, "rb"))
dim = int(points[0].vector.shape[-1])
sink = open_vector_sink(uri)
sink.ensure(dim, False)

def attempt(fn):
    try:
        fn()
        return "ok"
    except Transient as e:
        return f"Transient({e.kind}): {e}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
full = {"upsert": attempt(lambda: sink.upsert(points)),
        "create": attempt(lambda: open_vector_sink(other_uri).ensure(dim, False))}
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
full["upsert_after"] = attempt(lambda: sink.upsert(points))
full["count"] = sink.count()
full["create_after"] = attempt(lambda: open_vector_sink(other_uri).ensure(dim, False))
print(json.dumps(full))
"""


def test_lancedb_io_errors_are_transient(tmp_path):
    """A full disk is the store's state, not the data: Lance reports it as a RuntimeError
    ("LanceError(IO)"), which must be retried, never dead-lettered. RLIMIT_FSIZE stands in for a full
    disk (no mount needed; works as root)."""
    uri, other = f"lancedb://{tmp_path}/lance/full", f"lancedb://{tmp_path}/lance/full_new"
    sink = open_vector_sink(uri)
    sink.ensure(DIM, multivector=False)
    sink.upsert(make_points(5))
    sink.close()
    points_file = tmp_path / "points.pkl"
    points_file.write_bytes(pickle.dumps(make_points(200, seed=11)))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, uri, other, str(points_file)], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["upsert"].startswith(f"Transient(sink): {uri}: ") and "File too large" in got["upsert"], got
    assert got["create"].startswith(f"Transient(sink): {other}: "), got
    assert got["upsert_after"] == "ok" and got["count"] == 205, got
    assert got["create_after"] == "ok", got
    again = open_vector_sink(uri)
    assert again.count() == 205
    again.close()


def test_pgvector_mixed_case_table(postgres, monkeypatch):
    """Table names are quoted identifiers: `Images` and `images` are two tables, and describe() must
    read the one it names."""
    pg = postgres
    monkeypatch.setenv("PGPASSWORD", pg.env["PGPASSWORD"])
    tag = uuid.uuid4().hex[:8]
    lower = open_vector_sink(pg.uri(f"images_{tag}"))
    assert lower.ensure(16, multivector=False) == 16
    mixed = open_vector_sink(pg.uri(f"Images_{tag}"))
    assert mixed.ensure(DIM, multivector=False) == DIM
    mixed.close()
    again = open_vector_sink(pg.uri(f"Images_{tag}"))
    assert again.describe() == (DIM, False)
    assert again.ensure(DIM + 8, multivector=False) == DIM
    again.upsert(make_points(3))
    assert again.count() == 3 and lower.count() == 0
    assert lower.describe() == (16, False)
    again.close()
    lower.close()
