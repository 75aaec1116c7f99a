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
import errno
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit


class ObjectNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    metadata: dict[str, str]


class ObjectStore(ABC):
    commit_linger_s = 0.0  # how long a writer may wait to batch puts into one commit
    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool: ...

    def put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        """Several puts; a backend may commit them together (one directory fsync, ...)."""
        return [self.put_if_absent(k, d, m) for k, d, m in items]

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    def head_many(self, keys: list[str]) -> list[ObjectInfo | None]:
        return [self.head(k) for k in keys]

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    def close(self) -> None:
        pass


class LocalDirStore(ObjectStore):
    """A directory on a local or shared filesystem (the embedded default).

    Data appears through ``link()``, which is atomic and fails if the key exists:
    put-if-absent without locks, across processes. Metadata rides on the file as an
    extended attribute set before the link, so an object that exists always has it; where
    the filesystem has no user xattrs, a ``<key>.meta.json`` sidecar written before the
    link does the same job.
    """

    XATTR = "user.vllm_mm_events"

    def __init__(self, root: str | os.PathLike, fsync: bool = True, xattrs: bool = True):
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self.xattrs = xattrs and hasattr(os, "setxattr")
        # One sync per batch costs about as much as one per object: batch for up to 50 ms
        # (the events wait for these objects, so this bounds their extra latency too).
        self.commit_linger_s = 0.05 if fsync else 0.0
        self._dirs: set[str] = set()
        self._seq = 0
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        # Keys are ours (content-addressed), but never let one escape the root.
        if not key or key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"object key {key!r}: expected a relative path without '.', '..' or empty parts")
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        return "file://" + quote(self._path(key))

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool:
        return self.put_many([(key, data, metadata)])[0]

    def put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        """Group commit: write every file (data + metadata, fsynced), then link them all, then
        fsync each directory once. Each object is durable when this returns."""
        staged: list[tuple[str, str]] = []
        for key, data, metadata in items:
            path = self._path(key)
            parent = path.rsplit("/", 1)[0]
            if parent not in self._dirs:
                os.makedirs(parent, exist_ok=True)
                self._dirs.add(parent)
            staged.append((path, self._stage(path, data, json.dumps(metadata).encode())))
        if self.fsync:
            self._sync([e[1] for e in staged if e is not None])
        results, dirs = [], set()
        for path, tmp in staged:
            try:
                os.link(tmp, path)
                results.append(True)
                dirs.add(path.rsplit("/", 1)[0])
            except FileExistsError:
                results.append(False)
            finally:
                os.unlink(tmp)
        if self.fsync:
            for d in dirs:
                _fsync_dir(d)  # the links themselves must survive a crash
        return results

    def _stage(self, path: str, data: bytes, meta: bytes) -> str:
        parent, name = path.rsplit("/", 1)
        with self._lock:
            self._seq += 1
            tmp = f"{parent}/.{name}.{os.getpid()}.{self._seq}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.xattrs:
                try:
                    os.setxattr(fd, self.XATTR, meta)
                except OSError as e:
                    if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    self.xattrs = False  # this filesystem has none: fall back to sidecars
            if not self.xattrs:
                self._write_sidecar(path, meta)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _sync(self, paths: list[str]) -> None:
        """Make staged files durable: one syncfs(2) for the batch where Linux has it
        (a fraction of per-file fsyncs at any batch size), else an fsync per file."""
        if not paths:
            return
        if _SYNCFS is not None:
            fd = os.open(paths[0], os.O_RDONLY)
            try:
                if _SYNCFS(fd) == 0:
                    return
            finally:
                os.close(fd)
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_sidecar(self, path: str, meta: bytes) -> None:
        side = path + ".meta.json"
        tmp = f"{side}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(meta)
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, side)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        try:
            meta = os.getxattr(path, self.XATTR)
        except OSError:
            meta = Path(path + ".meta.json").read_bytes()
        return ObjectInfo(key, size, json.loads(meta))

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None


def _load_syncfs():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store(ObjectStore):
    """S3 and S3-compatible stores (MinIO, Ceph, R2, ...).

    Writes use ``If-None-Match: *`` (put-if-absent) and carry ``x-amz-checksum-sha256``,
    so the server rejects corrupted bodies; the SHA-256 is the one the event names.
    PUT and HEAD, the per-item calls, go through ``S3Lite`` (SigV4 over keep-alive
    connections, a fraction of boto3's CPU); GET uses boto3. Credentials come from the
    standard AWS chain and are never logged.
    """

    CONTENT_TYPE = "application/vnd.safetensors"

    def __init__(self, bucket: str, endpoint_url: str | None = None, region: str | None = None,
                 max_connections: int = 10):
        from publisher.s3lite import S3Lite

        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._max_connections = max_connections
        self._lite = S3Lite(endpoint_url, region)
        self._boto = None
        # S3 calls are round trips: batches go out in parallel.
        self._pool = ThreadPoolExecutor(max_connections, thread_name_prefix="mm-events-s3")

    def _client(self):
        if self._boto is None:
            import boto3
            from botocore.config import Config

            cfg = Config(max_pool_connections=self._max_connections, retries={"max_attempts": 5, "mode": "standard"},
                         s3={"addressing_style": "path" if self.endpoint_url else "auto"})
            # A client per store; botocore clients are thread-safe, sessions are not.
            self._boto = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                                                        region_name=self.region, config=cfg)
        return self._boto

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool:
        sha_hex = metadata.get("sha256") or hashlib.sha256(data).hexdigest()
        sha_b64 = base64.b64encode(bytes.fromhex(sha_hex)).decode()
        return self._lite.put_if_absent(self.bucket, key, data, sha_hex, sha_b64, metadata, self.CONTENT_TYPE)

    def put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        return list(self._pool.map(lambda item: self.put_if_absent(*item), items))

    def head_many(self, keys: list[str]) -> list[ObjectInfo | None]:
        return list(self._pool.map(self.head, keys))

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def head(self, key: str) -> ObjectInfo | None:
        r = self._lite.head(self.bucket, key)
        return None if r is None else ObjectInfo(key, r[0], r[1])

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(self.uri(key)) from None
            raise


@dataclass(frozen=True)
class StoreLocation:
    """Where objects go, without a client: enough to name an object's URI (the scheduler's need)."""
    scheme: str
    root: str  # bucket, or the directory
    prefix: str  # key prefix (S3); empty for a directory

    @classmethod
    def parse(cls, uri: str) -> "StoreLocation":
        u = urlsplit(uri)
        if u.scheme == "s3":
            return cls("s3", u.netloc, u.path.strip("/"))
        if u.scheme == "file":
            return cls("file", unquote(u.path), "")
        raise ValueError(f"object_store: expected s3://bucket/prefix or file:///dir, got {uri!r}")

    def uri(self, key: str) -> str:
        if self.scheme == "s3":
            return f"s3://{self.root}/{key}"
        return "file://" + quote(f"{os.path.abspath(self.root)}/{key}")


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
               fsync: bool = True, max_connections: int = 10) -> tuple[ObjectStore, str]:
    """``s3://bucket/prefix`` or ``file:///dir`` -> (store, key prefix). The one place a backend is chosen."""
    loc = StoreLocation.parse(uri)
    if loc.scheme == "s3":
        return S3Store(loc.root, endpoint_url, region, max_connections), loc.prefix
    return LocalDirStore(loc.root, fsync=fsync), loc.prefix


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
