"""One contract, every object store: the local directory and S3 (a real MinIO server)."""

import hashlib
import threading
import uuid
from pathlib import Path

import pytest

from publisher.stores import ObjectNotFound, open_store
from publisher.stores.base import ObjectTooLarge
from publisher.stores.local import LocalDirStore


@pytest.fixture(params=["local", "local-named-temp-files", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        s, prefix = open_store((tmp_path / "objects").as_uri())
    elif request.param == "local-named-temp-files":  # where the filesystem has no O_TMPFILE
        s = LocalDirStore(tmp_path / "objects", tmpfile=False)
    else:
        minio = request.getfixturevalue("minio")
        for k, v in minio.env.items():
            monkeypatch.setenv(k, v)
        bucket = minio.create_bucket(f"contract-{uuid.uuid4().hex[:8]}")
        s, prefix = open_store(f"s3://{bucket}/pre/fix", endpoint_url=minio.endpoint)
        assert prefix == "pre/fix"
    yield s
    s.close()


def meta(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "dtype": "float32", "shape": "[2, 2]"}


def test_put_head_get(store):
    data = b"x" * 1000
    assert store.head("a/b/c.safetensors") is None
    assert store.put_if_absent("a/b/c.safetensors", data, meta(data)) is True
    info = store.head("a/b/c.safetensors")
    assert info.size == 1000 and info.metadata == meta(data)
    assert store.get("a/b/c.safetensors") == data


def test_calls_in_a_row_each_act_once(store):
    """Many calls on one thread (S3: one keep-alive connection): each fresh key is new exactly once,
    so no call was silently sent twice."""
    datas = [bytes([i]) * (100 + i) for i in range(12)]
    assert [store.put_if_absent(f"row/{i}", d, meta(d)) for i, d in enumerate(datas)] == [True] * 12
    assert [store.get(f"row/{i}") for i in range(12)] == datas
    assert [store.head(f"row/{i}").size for i in range(12)] == [len(d) for d in datas]
    assert [store.put_if_absent(f"row/{i}", d, meta(d)) for i, d in enumerate(datas)] == [False] * 12


def test_put_if_absent_writes_once(store):
    first, second = b"first", b"second"
    assert store.put_if_absent("k", first, meta(first)) is True
    assert store.put_if_absent("k", second, meta(second)) is False
    assert store.get("k") == first and store.head("k").metadata == meta(first)


def test_concurrent_writers_one_winner(store):
    data = b"same bytes" * 100
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.put_if_absent("race", data, meta(data))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and store.get("race") == data


def test_missing_object(store):
    with pytest.raises(ObjectNotFound):
        store.get("nope")


def test_uri_names_the_object(store):
    uri = store.uri("x/y.safetensors")
    assert uri.endswith("/x/y.safetensors")
    assert uri.startswith(("file:///", "s3://"))


def test_get_refuses_an_object_over_the_cap_and_carries_on(store):
    """A reader of untrusted URIs caps what it reads: over the cap is refused (S3: from the
    Content-Length, before the body is read), at the cap is returned, and the store serves the
    next call as usual (S3: the keep-alive connection left mid-body is not reused)."""
    big, small = bytes(range(256)) * 4096, b"s" * 4096  # 1 MiB and 4 KiB
    store.put_if_absent("big", big, meta(big))
    store.put_if_absent("small", small, meta(small))
    for _ in range(3):
        with pytest.raises(ObjectTooLarge, match="big"):
            store.get("big", max_bytes=len(big) - 1)
        assert store.get("small", max_bytes=len(small)) == small
    assert store.get("big", max_bytes=len(big)) == big


def test_put_many_stores_each_once_across_directories(store, tmp_path):
    """A batch (the uploader's group commit): objects in several directories, a key repeated in the
    batch and one already stored; each new key is written once with its own bytes and metadata, and
    (local) nothing but the objects is left in the directories: no temporary files."""
    datas = {f"m{i % 3}/f32/{i}.safetensors": bytes([i]) * (500 + i) for i in range(9)}
    store.put_if_absent("m0/f32/0.safetensors", datas["m0/f32/0.safetensors"], meta(datas["m0/f32/0.safetensors"]))
    items = [(k, d, meta(d)) for k, d in datas.items()] + [("m1/f32/1.safetensors", b"other", meta(b"other"))]
    assert store.put_many(items) == [False] + [True] * 8 + [False]
    for k, d in datas.items():
        assert store.get(k) == d and store.head(k).metadata == meta(d)
    if isinstance(store, LocalDirStore):
        left = sorted(str(p.relative_to(store.root)) for p in Path(store.root).rglob("*") if p.is_file())
        assert left == sorted(datas)
        assert {p.stat().st_mode & 0o777 for p in Path(store.root).rglob("*.safetensors")} == {0o640}
