"""The S3 store's own behaviour beyond the object-store contract, against a real MinIO server."""

import uuid

import numpy as np
import pytest
from contract.test_object_store import meta

from publisher.stores import open_store


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


def test_s3_reads_what_boto3_wrote(minio, monkeypatch):
    """GETs go through the lean client too: the bytes boto3 stored, under a key that needs escaping,
    at a realistic size (one LLaVA-1.5-7B image's features in bf16), read back exactly."""
    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"read-{uuid.uuid4().hex[:8]}")
    data = np.random.default_rng(0).integers(0, 256, 576 * 4096 * 2, dtype=np.uint8).tobytes()
    minio.client().put_object(Bucket=bucket, Key="a b/ü+%.safetensors", Body=data)
    s, _ = open_store(f"s3://{bucket}", endpoint_url=minio.endpoint)
    assert bytes(s.get("a b/ü+%.safetensors")) == data
    assert bytes(s.get("a b/ü+%.safetensors", max_bytes=len(data))) == data


def test_s3_one_keep_alive_connection_carries_every_call(minio, monkeypatch):
    """PUT, HEAD (hit and miss), GET (hit, miss, refused over the cap) in a row on one thread: every call
    answered on the connection the previous one left ready, so none was sent twice (a resent PUT would
    come back 412 and report a fresh object as already stored); only the over-cap GET, whose body is
    left unread, costs a new connection."""
    from publisher.stores.base import ObjectNotFound, ObjectTooLarge

    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"keepalive-{uuid.uuid4().hex[:8]}")
    s, _ = open_store(f"s3://{bucket}", endpoint_url=minio.endpoint)
    connections, calls = [], []

    def conn():
        c = s._lite._local.conn
        if not connections or connections[-1] is not c:
            connections.append(c)
        calls.append(f"{len(connections)}")
    for i in range(5):
        data = bytes([i]) * 1000
        assert s.put_if_absent(f"k{i}", data, meta(data)) is True
        conn()
        assert s.head(f"k{i}").size == 1000 and s.head(f"none{i}") is None
        conn()
        assert s.get(f"k{i}") == data
        conn()
        with pytest.raises(ObjectNotFound):
            s.get(f"none{i}")
        conn()
    assert len(connections) == 1, calls
    with pytest.raises(ObjectTooLarge):
        s.get("k0", max_bytes=999)
    assert s.get("k1") == bytes([1]) * 1000
    conn()
    assert len(connections) == 2, calls


def test_s3_wrong_credentials_fail_clearly(minio, monkeypatch):
    from publisher.stores.base import PermanentStoreError

    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"auth-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s, _ = open_store(f"s3://{bucket}", endpoint_url=minio.endpoint)
    with pytest.raises(PermanentStoreError, match="403") as e:  # the uploader does not retry it for long
        s.put_if_absent("k", b"x", meta(b"x"))
    assert "not-the-secret" not in str(e.value)
    with pytest.raises(PermanentStoreError, match="403") as e:  # a consumer retries it a bounded number of times
        s.get("k")
    assert "not-the-secret" not in str(e.value)


def test_s3_get_from_a_bucket_that_does_not_exist_is_permanent(minio, monkeypatch):
    from publisher.stores.base import PermanentStoreError

    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    s, _ = open_store(f"s3://no-such-{uuid.uuid4().hex[:8]}", endpoint_url=minio.endpoint)
    with pytest.raises(PermanentStoreError, match="NoSuchBucket"):
        s.get("k")


def test_s3_rejects_a_corrupted_body(minio, monkeypatch):
    """The SHA-256 the event names is checked by the server, not just computed."""
    from publisher.stores.s3_lean import S3Error

    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"corrupt-{uuid.uuid4().hex[:8]}")
    s, _ = open_store(f"s3://{bucket}", endpoint_url=minio.endpoint)
    with pytest.raises(S3Error, match="SHA256Mismatch|ChecksumMismatch"):
        s.put_if_absent("k", b"corrupted", meta(b"original"))
    assert s.head("k") is None
