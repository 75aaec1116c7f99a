"""The one read path from an object's URI to its bytes, for every reader of stored objects
(``load_mm_embeddings``, the consumers, ``search``).

One store client per bucket or directory, built on first use (S3 clients are costly to
build) and shared by threads.
"""

from __future__ import annotations

import threading

from publisher.stores.base import ObjectStore
from schemas.uris import split_object_uri


class ObjectReader:
    """``get(uri)`` -> bytes; ``ObjectNotFound`` if absent, ``ValueError`` for a URI of no known form."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None):
        self.endpoint_url = endpoint_url
        self.region = region
        self._stores: dict[tuple[str, str], ObjectStore] = {}
        self._lock = threading.Lock()

    def store_for(self, uri: str) -> tuple[ObjectStore, str]:
        """(the store holding ``uri``, its key there)."""
        scheme, root, key = split_object_uri(uri)
        with self._lock:
            store = self._stores.get((scheme, root))
            if store is None:
                store = self._stores[(scheme, root)] = self._open(scheme, root)
        return store, key

    def _open(self, scheme: str, root: str) -> ObjectStore:
        if scheme == "s3":
            from publisher.stores.s3 import S3Store

            return S3Store(root, self.endpoint_url, self.region)
        from publisher.stores.local import LocalDirStore

        return LocalDirStore(root, fsync=False)

    def get(self, uri: str) -> bytes:
        store, key = self.store_for(uri)
        return store.get(key)

    def close(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for s in stores:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
