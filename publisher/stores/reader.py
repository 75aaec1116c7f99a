"""The one read path from an object's URI to its bytes, for every reader of stored objects
(``load_mm_embeddings``, the consumers, ``search``).

URIs come from outside (an event on a topic, a response body), so a URI is read only when it
falls inside a store the reader was configured with: the same bucket and key prefix, or a
path that, with every symlink resolved, is inside the configured directory. Anything else is
``ForbiddenObject`` and is never opened. Reads are capped at ``max_bytes``.

One store client per configured store, built on first use (S3 clients are costly to build)
and shared by threads.
"""

from __future__ import annotations

import os
import threading
from typing import Iterable

from publisher.stores.base import ForbiddenObject, ObjectStore, PermanentStoreError
from schemas.uris import StoreLocation, split_object_uri

DEFAULT_MAX_OBJECT_BYTES = 256 << 20


class ObjectReader:
    """``get(uri)`` -> bytes, only from the allowed stores.

    ``stores``: store URIs (``s3://bucket/prefix``, ``file:///dir``) this reader may read.
    ``any_bucket``: also read any ``s3://`` bucket (``load_mm_embeddings``: the caller's own
    credentials, returned to the caller alone); local paths stay limited to ``stores``.
    Raises ``ForbiddenObject`` (outside every store, or a URI of no known form),
    ``ObjectNotFound``, ``ObjectTooLarge`` or ``PermanentStoreError``.
    """

    def __init__(self, stores: Iterable[str], endpoint_url: str | None = None, region: str | None = None,
                 max_bytes: int | None = DEFAULT_MAX_OBJECT_BYTES, any_bucket: bool = False):
        self.locations = [StoreLocation.parse(s) for s in stores]
        self._dirs = [(loc, os.path.realpath(loc.root)) for loc in self.locations if loc.scheme == "file"]
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_bytes = max_bytes
        self.any_bucket = any_bucket
        self._stores: dict[tuple[str, str], ObjectStore] = {}
        self._lock = threading.Lock()

    def resolve(self, uri: str) -> tuple[str, str, str]:
        """An object URI -> (scheme, root, key) inside an allowed store; ``ForbiddenObject`` otherwise."""
        try:
            scheme, root, key = split_object_uri(uri)
        except ValueError as e:
            raise ForbiddenObject(str(e).removeprefix("uri: ")) from None
        if scheme == "s3":
            for loc in self.locations:
                if loc.scheme == "s3" and loc.root == root and (
                        not loc.prefix or key.startswith(loc.prefix.rstrip("/") + "/")):
                    return "s3", root, key
            if self.any_bucket:
                return "s3", root, key
        else:
            real = os.path.realpath(os.path.join(root, key))  # resolves '..' and every symlink before the check
            for loc, store_root in self._dirs:
                if real.startswith(store_root.rstrip("/") + "/"):
                    return "file", loc.root, os.path.relpath(real, store_root)
        allowed = ", ".join(loc.uri("").rstrip("/") for loc in self.locations) or "none"
        raise ForbiddenObject(f"{uri[:200]}: outside the configured object store(s) ({allowed})")

    def _store(self, scheme: str, root: str) -> ObjectStore:
        with self._lock:
            store = self._stores.get((scheme, root))
            if store is None:
                store = self._stores[(scheme, root)] = self._open(scheme, root)
            return store

    def _open(self, scheme: str, root: str) -> ObjectStore:
        if scheme == "s3":
            from publisher.stores.s3 import S3Store

            try:
                return S3Store(root, self.endpoint_url, self.region)
            except RuntimeError as e:  # no credentials in the standard chain
                raise PermanentStoreError(f"s3://{root}: {e}") from None
        from publisher.stores.local import LocalDirStore

        return LocalDirStore(root, fsync=False)

    def get(self, uri: str) -> bytes:
        scheme, root, key = self.resolve(uri)
        return self._store(scheme, root).get(key, self.max_bytes)

    def close(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for s in stores:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
