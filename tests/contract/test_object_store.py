"""One contract, every object store: the local directory and S3 (a real MinIO server)."""

import hashlib
import threading
import uuid

import pytest

from publisher.stores import ObjectNotFound, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        s, prefix = open_store((tmp_path / "objects").as_uri())
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
