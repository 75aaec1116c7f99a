"""Object stores behind one interface (``base.ObjectStore``): ``local`` (a directory, the
embedded default) and ``s3`` (S3 and compatible stores). ``open_store`` is the one place a
backend is chosen; ``reader.ObjectReader`` is the one read path from an object's URI.
"""

from __future__ import annotations

from publisher.stores.base import ObjectInfo, ObjectNotFound, ObjectStore
from schemas.uris import StoreLocation

__all__ = ["ObjectInfo", "ObjectNotFound", "ObjectStore", "StoreLocation", "open_store"]


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
               fsync: bool = True, max_connections: int = 10) -> tuple[ObjectStore, str]:
    """``s3://bucket/prefix`` or ``file:///dir`` -> (store, key prefix)."""
    loc = StoreLocation.parse(uri)
    if loc.scheme == "s3":
        from publisher.stores.s3 import S3Store

        return S3Store(loc.root, endpoint_url, region, max_connections), loc.prefix
    from publisher.stores.local import LocalDirStore

    return LocalDirStore(loc.root, fsync=fsync), loc.prefix
