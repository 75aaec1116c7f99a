"""The object store interface: where the worker writes and the scheduler waits, then names.

Contract (``tests/contract/test_object_store.py`` runs it against every backend):
- ``put_if_absent(key, data, metadata)`` writes atomically and only once; True if this
  call wrote it. Once it returns, the object is durable.
- ``head(key)`` -> ``ObjectInfo`` (size + the metadata given at put) or None. An object
  is either absent or complete: readers never see a partial write.
- ``get(key)`` -> bytes, or ``ObjectNotFound``; ``uri(key)`` -> the object's URI.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class ObjectNotFound(FileNotFoundError):
    """No object under that key (the message is its URI)."""


class ObjectTooLarge(ValueError):
    """The object is larger than the reader's cap (``get(key, max_bytes)``); nothing more was read."""


class PermanentStoreError(RuntimeError):
    """A read that retrying will not fix without an operator: access denied, no such bucket, not a
    regular file. Readers may retry a bounded number of times (permissions propagate), then give up."""


class ForbiddenObject(PermissionError):
    """A URI outside every store the reader may read: it is never opened."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    metadata: dict[str, str]


class ObjectStore(ABC):
    """One bucket or directory. Usable as a context manager (closes on exit)."""

    # How long a writer may wait to batch puts into one commit (0: no batching helps).
    commit_linger_s = 0.0

    @abstractmethod
    def uri(self, key: str) -> str:
        """The URI naming the object stored under ``key`` (what events carry)."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str]) -> bool:
        """Store ``data`` under ``key`` unless an object is there; True if this call wrote it.

        Atomic (readers see all or nothing) and durable when it returns.
        """

    def put_many(self, items: list[tuple[str, bytes, dict[str, str]]]) -> list[bool]:
        """Several puts; a backend may commit them together (one sync, parallel requests)."""
        return [self.put_if_absent(k, d, m) for k, d, m in items]

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and metadata of a complete object, or None if there is none."""

    def head_many(self, keys: list[str]) -> list[ObjectInfo | None]:
        return [self.head(k) for k in keys]

    @abstractmethod
    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; ``ObjectNotFound`` if absent, ``ObjectTooLarge`` past ``max_bytes``
        (checked before reading and enforced while reading), ``PermanentStoreError`` for what
        retrying will not fix."""

    def close(self) -> None:
        """Release clients and threads; the store is not used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
