"""The URI forms of object stores and of the objects in them: the one place they are written or read.

- a store: ``s3://bucket/prefix`` or ``file:///dir``;
- an object: ``s3://bucket/key`` or ``file:///dir/key`` (percent-quoted path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

STORE_SCHEMES = ("s3", "file")


@dataclass(frozen=True)
class StoreLocation:
    """Where objects go, without a client: enough to name an object's URI (the scheduler's need)."""

    scheme: str  # s3 or file
    root: str  # the bucket, or the directory (absolute)
    prefix: str = ""  # key prefix (S3); empty for a directory

    @classmethod
    def parse(cls, uri: str) -> "StoreLocation":
        """``s3://bucket/prefix`` or ``file:///dir`` -> location; ValueError otherwise."""
        u = urlsplit(uri)
        if u.scheme == "s3" and u.netloc:
            return cls("s3", u.netloc, u.path.strip("/"))
        if u.scheme == "file":
            return cls("file", os.path.abspath(unquote(u.path)), "")
        raise ValueError(f"object_store: expected s3://bucket/prefix or file:///dir, got {uri!r}")

    def uri(self, key: str) -> str:
        """The URI of the object stored under ``key`` here."""
        return object_uri(self.scheme, self.root, key)


def object_uri(scheme: str, root: str, key: str) -> str:
    """``("s3", bucket, key)`` -> ``s3://bucket/key``; ``("file", dir, key)`` -> ``file:///dir/key``."""
    if scheme == "s3":
        return f"s3://{root}/{key}"
    if scheme == "file":
        return "file://" + quote(f"{os.path.abspath(root)}/{key}")
    raise ValueError(f"object store scheme: expected one of {', '.join(STORE_SCHEMES)}, got {scheme!r}")


# No store holds a longer name: S3 keys are at most 1024 bytes; a file path, 4096 (PATH_MAX), each
# part 255 (NAME_MAX). A longer one fails at the store every time, and would otherwise be retried
# as if the store were away (ENAMETOOLONG, or an S3 400), holding its partition for good.
MAX_S3_KEY_BYTES = 1024
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


def split_object_uri(uri: str) -> tuple[str, str, str]:
    """An object's URI -> (scheme, root, key): (``s3``, bucket, key) or (``file``, directory, file name).

    Strict, as URIs come from outside: no query, fragment or NUL; an s3 key has no ``.``/``..``
    segments; no name longer than a store can hold. ``ValueError`` (naming ``uri``) for anything else."""
    u = urlsplit(uri)
    if not u.query and not u.fragment and "\0" not in uri:
        if u.scheme == "s3" and u.netloc and u.path.strip("/"):
            key = u.path.lstrip("/")
            if any(part in (".", "..") for part in key.split("/")):
                raise ValueError(f"uri: a key with '.' or '..' segments is not an object's: {uri[:200]!r}")
            if len(key.encode()) > MAX_S3_KEY_BYTES:
                raise ValueError(f"uri: a key over {MAX_S3_KEY_BYTES} bytes is not an object's: {uri[:200]!r}")
            return "s3", u.netloc, key
        if u.scheme == "file" and u.netloc in ("", "localhost") and u.path.startswith("/"):
            path = unquote(u.path)
            parent, _, name = path.rpartition("/")
            if len(path.encode()) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in path.split("/")):
                raise ValueError(f"uri: a path longer than a file system holds is not an object's: {uri[:200]!r}")
            if name and "\0" not in path:
                return "file", parent or "/", name
    raise ValueError(f"uri: expected s3://bucket/key or file:///path, got {uri[:200]!r}")
