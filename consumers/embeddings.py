"""From an event's item to the vector that is indexed: fetch, verify, decode, pool.

Torch-free on purpose: the consumer image stays slim. The safetensors layout is the one
``publisher/tensors.py`` writes (one tensor named ``embedding``); bfloat16 is widened
to float32 by bit shifting, as numpy has no bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

import numpy as np

TENSOR_NAME = "embedding"
_NP_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_EVENT_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# Point ids: UUIDv5 of "<event_id>/<item_index>" in this namespace (README: "Point ids").
POINT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:vllm-mm-events:point")


def point_id(event_id: str, item_index: int) -> str:
    """One point per media item of one event: replays and re-deliveries rewrite the same point."""
    return str(uuid.uuid5(POINT_ID_NAMESPACE, f"{event_id}/{item_index}"))


class Poison(Exception):
    """A record that can never be indexed as it is; it goes to the dead-letter queue.

    ``kind`` is one of: undecodable, unknown_schema, missing_object, checksum_mismatch,
    bad_object, dimension_mismatch.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Transient(Exception):
    """A failure worth retrying (network, throttling, a store or sink briefly away)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Point:
    id: str
    vector: np.ndarray  # (dim,) or, for pooling=none, (num_features, dim)
    payload: dict[str, Any]


def decode_safetensors(data: bytes) -> tuple[np.ndarray, dict[str, str], str]:
    """Bytes -> (float32 array, __metadata__, safetensors dtype name)."""
    if len(data) < 8:
        raise ValueError("not a safetensors object: shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("not a safetensors object: bad header length")
    try:
        header = json.loads(data[8:8 + n])
        spec = header[TENSOR_NAME]
        dtype = _NP_DTYPES[spec["dtype"]]
        begin, end = spec["data_offsets"]
        shape = tuple(int(d) for d in spec["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not an embedding object: bad safetensors header ({e!r})") from None
    raw = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=8 + n + begin)
    if raw.size != int(np.prod(shape)):
        raise ValueError(f"tensor holds {raw.size} values, shape {list(shape)} needs {int(np.prod(shape))}")
    if spec["dtype"] == "BF16":
        arr = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        arr = raw.astype(np.float32)
    return arr.reshape(shape), dict(header.get("__metadata__") or {}), spec["dtype"]


def verify_and_decode(item: Mapping[str, Any], data: bytes) -> np.ndarray:
    """Check the object against the event (sha256, size, dtype, shape); raise Poison if it differs."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != item["sha256"] or len(data) != item["size_bytes"]:
        raise Poison("checksum_mismatch", f"{item['uri']}: sha256 {digest[:16]}… ({len(data)} bytes) does not match "
                                          f"the event's {item['sha256'][:16]}… ({item['size_bytes']} bytes)")
    try:
        arr, _meta, st_dtype = decode_safetensors(data)
    except ValueError as e:
        raise Poison("bad_object", f"{item['uri']}: {e}") from None
    if _EVENT_DTYPE.get(item["dtype"]) != st_dtype:
        raise Poison("bad_object", f"{item['uri']}: dtype {st_dtype}, the event says {item['dtype']}")
    if list(arr.shape) != list(item["shape"]):
        raise Poison("bad_object", f"{item['uri']}: shape {list(arr.shape)}, the event says {list(item['shape'])}")
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise Poison("bad_object", f"{item['uri']}: expected a non-empty (num_features, hidden) tensor, got {list(arr.shape)}")
    return arr


def pool(features: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """(num_features, hidden) -> (hidden,) for mean/first/max, or (num_features, hidden) for none."""
    if pooling == "mean":
        v = features.mean(axis=0)
    elif pooling == "first":
        v = features[0].copy()
    elif pooling == "max":
        v = features.max(axis=0)
    elif pooling == "none":
        v = np.ascontiguousarray(features, dtype=np.float32)
    else:
        raise ValueError(f"pooling: expected mean, first, max or none, got {pooling!r}")
    if normalize:
        norms = np.linalg.norm(v, axis=-1, keepdims=True)
        v = v / np.where(norms == 0, 1, norms)
    if not np.all(np.isfinite(v)):
        raise Poison("bad_object", "the embedding holds NaN or infinite values")
    return v.astype(np.float32, copy=False)


def point_payload(event: Mapping[str, Any], item: Mapping[str, Any], pooling: str) -> dict[str, Any]:
    return {
        "request_id": event["request_id"],
        "event_id": event["event_id"],
        "item_index": int(item["item_index"]),
        "mm_hash": item["mm_hash"],
        "modality": item["modality"],
        "model": event["model"],
        "uri": item["uri"],
        "event_time": _millis(event["event_time"]),
        "pooling": pooling,
        "metadata": dict(event.get("metadata") or {}),
    }


def _millis(t: Any) -> int:
    # fastavro hands timestamp-millis back as an aware datetime.
    return int(t.timestamp() * 1000) if hasattr(t, "timestamp") else int(t)


class ObjectFetcher:
    """GETs objects named by ``s3://`` or ``file://`` URIs; one S3 client per bucket."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None):
        self.endpoint_url = endpoint_url
        self.region = region
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, uri: str) -> bytes:
        from publisher.store import ObjectNotFound, S3Store

        u = urlsplit(uri)
        if u.scheme == "file":
            try:
                return Path(unquote(u.path)).read_bytes()
            except FileNotFoundError:
                raise Poison("missing_object", f"{uri}: no such object") from None
            except OSError as e:
                raise Transient("object_store", f"{uri}: {e.strerror}") from None
        if u.scheme != "s3" or not u.netloc:
            raise Poison("bad_object", f"uri: expected s3://bucket/key or file:///path, got {uri!r}")
        with self._lock:
            store = self._stores.get(u.netloc)
            if store is None:
                store = self._stores[u.netloc] = S3Store(u.netloc, self.endpoint_url, self.region)
        try:
            return store.get(u.path.lstrip("/"))
        except ObjectNotFound:
            raise Poison("missing_object", f"{uri}: no such object") from None
        except Exception as e:  # noqa: BLE001 - network, throttling, credentials: retried, never dead-lettered
            raise Transient("object_store", f"{uri}: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        for s in self._stores.values():
            s.close()
