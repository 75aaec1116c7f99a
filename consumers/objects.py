"""From an event's item to a verified array: fetch the object, check it against the event, decode.

Torch-free on purpose: the consumer image stays slim. Fetching goes through the product's
one read path (``publisher.stores.reader``) and decoding through the one object reader
(``schemas.objects``); this module adds what a consumer must do with untrusted bytes:
verify them against the event, and type every failure as poison or transient.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterable, Mapping

import numpy as np

from consumers.errors import (
    BadObject,
    ChecksumMismatch,
    ForbiddenObjectPoison,
    MissingObject,
    ObjectTooLargePoison,
    Transient,
)
from publisher.stores.base import ForbiddenObject, ObjectNotFound, ObjectTooLarge, PermanentStoreError
from publisher.stores.reader import DEFAULT_MAX_OBJECT_BYTES, ObjectReader
from schemas import objects

log = logging.getLogger("vllm_mm_events.consumer")


def verify_and_decode(item: Mapping[str, Any], data: bytes) -> np.ndarray:
    """Check the object against the event (sha256, size, dtype, shape) -> float32 (num_features, hidden)."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != item["sha256"] or len(data) != item["size_bytes"]:
        raise ChecksumMismatch(f"{item['uri']}: sha256 {digest[:16]}… ({len(data)} bytes) does not match "
                               f"the event's {item['sha256'][:16]}… ({item['size_bytes']} bytes)")
    try:
        stored = objects.read_object(data)
    except objects.BadObject as e:
        raise BadObject(f"{item['uri']}: {e}") from None
    except Exception as e:  # noqa: BLE001 - bytes the reader did not foresee: this event's dead letter, not a
        # stopped consumer (an escaped error failed the whole batch, at every restart, on the same record)
        log.error("the object reader failed on %s; dead-lettering it", item["uri"], exc_info=True)
        raise BadObject(f"{item['uri']}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    if stored.dtype != item["dtype"]:
        raise BadObject(f"{item['uri']}: dtype {stored.dtype}, the event says {item['dtype']}")
    if list(stored.shape) != list(item["shape"]):
        raise BadObject(f"{item['uri']}: shape {list(stored.shape)}, the event says {list(item['shape'])}")
    if len(stored.shape) != 2 or stored.shape[0] == 0:
        raise BadObject(f"{item['uri']}: expected a non-empty (num_features, hidden) tensor, got {list(stored.shape)}")
    return stored.to_float32()


class ObjectFetcher:
    """GETs the objects events name, only from the configured stores, typing every failure:

    outside every store (or a URI of no known form) -> ``ForbiddenObjectPoison``, never opened;
    over ``max_bytes`` (the event's ``size_bytes``, or while reading) -> ``ObjectTooLargePoison``;
    absent -> ``MissingObject``; refused for good (access denied, no bucket, not a regular file)
    -> ``Transient`` retried ``permanent_after`` times, then ``PermanentErrorPoison``; anything
    else (network, throttling) -> ``Transient``, retried until it passes.
    """

    def __init__(self, stores: Iterable[str], endpoint_url: str | None = None, region: str | None = None,
                 max_bytes: int = DEFAULT_MAX_OBJECT_BYTES, permanent_after: int = 5):
        self.max_bytes = max_bytes
        self.permanent_after = permanent_after
        self._reader = ObjectReader(stores, endpoint_url, region, max_bytes=max_bytes)

    def check(self, item: Mapping[str, Any]) -> None:
        """What can be refused from the event alone, before any I/O."""
        uri = str(item["uri"])
        try:
            self._reader.resolve(uri)
        except ForbiddenObject as e:
            raise ForbiddenObjectPoison(str(e)) from None
        if not 0 <= int(item["size_bytes"]) <= self.max_bytes:
            raise ObjectTooLargePoison(f"{uri[:200]}: the event says {item['size_bytes']} bytes; "
                                       f"max_object_bytes is {self.max_bytes}")

    def get(self, uri: str) -> bytes:
        try:
            return self._reader.get(uri)
        except ForbiddenObject as e:
            raise ForbiddenObjectPoison(str(e)) from None
        except ObjectTooLarge as e:
            raise ObjectTooLargePoison(str(e)) from None
        except ObjectNotFound:
            raise MissingObject(f"{uri}: no such object") from None
        except PermanentStoreError as e:
            raise Transient("object_store", str(e), permanent_after=self.permanent_after) from None
        except Exception as e:  # noqa: BLE001 - retried, never dead-lettered
            raise Transient("object_store", f"{uri}: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
