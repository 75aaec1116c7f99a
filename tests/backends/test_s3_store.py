"""The S3 store's own behaviour beyond the object-store contract, against a real MinIO server."""

import uuid

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


def test_s3_rejects_a_corrupted_body(minio, monkeypatch):
    """The SHA-256 the event names is checked by the server, not just computed."""
    from publisher.stores.s3_put_head import S3Error

    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"corrupt-{uuid.uuid4().hex[:8]}")
    s, _ = open_store(f"s3://{bucket}", endpoint_url=minio.endpoint)
    with pytest.raises(S3Error, match="SHA256Mismatch|ChecksumMismatch"):
        s.put_if_absent("k", b"corrupted", meta(b"original"))
    assert s.head("k") is None
