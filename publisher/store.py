"""Object stores: the meeting point of the worker (writes) and the scheduler (waits, then names).

Contract (tests/contract/test_object_store.py runs it against every backend):
- ``put_if_absent(key, data, metadata)`` writes atomically and only once; True if this
  call wrote it. Once it returns, the object is durable.
- ``head(key)`` -> ``ObjectInfo`` (size + the metadata given at put) or None. An object
  is either absent or complete: readers never see a partial write.
- ``get(key)`` -> bytes; ``uri(key)`` -> the object's URI.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit


class ObjectNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    metadata: dict[str, str]


class ObjectStore(ABC):
    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool: ...

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    def close(self) -> None:
        pass


class LocalDirStore(ObjectStore):
    """A directory on a local or shared filesystem (the embedded default).

    Metadata lives in a ``<key>.meta.json`` sidecar written before the data file appears,
    so an object that exists always has its metadata. Data appears through ``link()``,
    which is atomic and fails if the key exists: put-if-absent without locks, across
    processes.
    """

    def __init__(self, root: str | os.PathLike, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise ValueError(f"object key {key!r} escapes the store root")
        return p

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool:
        path = self._path(key)
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path.with_name(path.name + ".meta.json"), json.dumps(metadata).encode(), replace=True)
        return self._write_atomic(path, data, replace=False)

    def _write_atomic(self, path: Path, data: bytes, replace: bool) -> bool:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if replace:
                os.replace(tmp, path)
                return True
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
        finally:
            if not replace:
                os.unlink(tmp)
            if self.fsync:
                _fsync_dir(path.parent)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        meta = json.loads(path.with_name(path.name + ".meta.json").read_bytes())
        return ObjectInfo(key, size, meta)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store(ObjectStore):
    """S3 and S3-compatible stores (MinIO, Ceph, R2, ...).

    Writes use ``If-None-Match: *`` (put-if-absent) and carry ``x-amz-checksum-sha256``,
    so the server rejects corrupted bodies; the SHA-256 is the one the event names.
    Credentials come from the standard AWS chain and are never logged.
    """

    def __init__(self, bucket: str, endpoint_url: str | None = None, region: str | None = None,
                 max_connections: int = 10):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.endpoint_url = endpoint_url
        cfg = Config(
            max_pool_connections=max_connections,
            retries={"max_attempts": 5, "mode": "standard"},
            # We send our own SHA-256; skip botocore's extra CRC pass over every body.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        # A client per store; botocore clients are thread-safe, sessions are not.
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)
        self._lock = threading.Lock()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool:
        from botocore.exceptions import ClientError

        sha_b64 = base64.b64encode(bytes.fromhex(metadata["sha256"])).decode() if "sha256" in metadata else None
        kwargs = dict(Bucket=self.bucket, Key=key, Body=data, Metadata=metadata, IfNoneMatch="*",
                      ContentType="application/vnd.safetensors")
        if sha_b64:
            kwargs["ChecksumSHA256"] = sha_b64
        try:
            self._client.put_object(**kwargs)
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or code == "PreconditionFailed":
                return False  # already there: content-addressed, so it is the same bytes
            if status == 409 or code == "ConditionalRequestConflict":
                # A concurrent writer of the same key; whoever wins wrote the same bytes.
                return False
            raise

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            r = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
        return ObjectInfo(key, int(r["ContentLength"]), dict(r.get("Metadata") or {}))

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(self.uri(key)) from None
            raise


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
               fsync: bool = True, max_connections: int = 10) -> tuple[ObjectStore, str]:
    """``s3://bucket/prefix`` or ``file:///dir`` -> (store, key prefix). The one place a backend is chosen."""
    u = urlsplit(uri)
    if u.scheme == "s3":
        return S3Store(u.netloc, endpoint_url, region, max_connections), u.path.strip("/")
    if u.scheme == "file":
        return LocalDirStore(unquote(u.path), fsync=fsync), ""
    raise ValueError(f"object_store: expected s3://bucket/prefix or file:///dir, got {uri!r}")


def open_object_uri(uri: str, *, endpoint_url: str | None = None, region: str | None = None
                    ) -> tuple[ObjectStore, str]:
    """An object's URI -> (store, key), for readers (client, consumers)."""
    u = urlsplit(uri)
    if u.scheme == "s3":
        return S3Store(u.netloc, endpoint_url, region), u.path.lstrip("/")
    if u.scheme == "file":
        path = Path(unquote(u.path))
        return LocalDirStore(path.parent, fsync=False), path.name
    raise ValueError(f"uri: expected s3://bucket/key or file:///path, got {uri!r}")
