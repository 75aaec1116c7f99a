"""One contract, every object store: the local directory and S3 (a real MinIO server)."""

import hashlib
import threading
import uuid

import pytest

from publisher.store import ObjectNotFound, open_store


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


def test_s3_metadata_and_bytes_agree_with_boto3(minio, monkeypatch):
    """What the lean client writes, the standard client reads back identically."""
    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"interop-{uuid.uuid4().hex[:8]}")
    s, _ = open_store(f"s3://{bucket}", endpoint_url=minio.endpoint)
    data = bytes(range(256)) * 40
    assert s.put_if_absent("dir/with space/ü.safetensors", data, meta(data))
    r = minio.client().get_object(Bucket=bucket, Key="dir/with space/ü.safetensors", ChecksumMode="ENABLED")
    assert r["Body"].read() == data and r["Metadata"] == meta(data)
    assert r["ContentType"] == "application/vnd.safetensors"


def test_s3_wrong_credentials_fail_clearly(minio, monkeypatch):
    from publisher.s3lite import S3Error

    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"auth-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s, _ = open_store(f"s3://{bucket}", endpoint_url=minio.endpoint)
    with pytest.raises(S3Error, match="403") as e:
        s.put_if_absent("k", b"x", meta(b"x"))
    assert "not-the-secret" not in str(e.value)


def test_uri_names_the_object(store):
    uri = store.uri("x/y.safetensors")
    assert uri.endswith("/x/y.safetensors")
    assert uri.startswith(("file:///", "s3://"))


def test_s3_rejects_a_corrupted_body(minio, monkeypatch):
    """The SHA-256 the event names is checked by the server, not just computed."""
    from publisher.s3lite import S3Error

    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"corrupt-{uuid.uuid4().hex[:8]}")
    s, _ = open_store(f"s3://{bucket}", endpoint_url=minio.endpoint)
    with pytest.raises(S3Error, match="SHA256Mismatch|ChecksumMismatch"):
        s.put_if_absent("k", b"corrupted", meta(b"original"))
    assert s.head("k") is None
