"""From a verified (num_features, hidden) array to what is indexed: the vector, its point id, its payload."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from consumers.errors import BadObject

POOLINGS = ("mean", "first", "max", "none")
# Point ids: UUIDv5 of "<event_id>/<item_index>" in this namespace (README: "Point ids").
POINT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:vllm-mm-events:point")
# What every sink stores beside the vector.
PAYLOAD_FIELDS = ("request_id", "event_id", "item_index", "mm_hash", "modality", "model", "uri", "event_time",
                  "pooling", "metadata")


@dataclass
class Point:
    id: str
    vector: np.ndarray  # (dim,) or, for pooling=none, (num_features, dim)
    payload: dict[str, Any]


def point_id(event_id: str, item_index: int) -> str:
    """One point per media item of one event: replays and re-deliveries rewrite the same point."""
    return str(uuid.uuid5(POINT_ID_NAMESPACE, f"{event_id}/{item_index}"))


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
        raise ValueError(f"pooling: expected {', '.join(POOLINGS)}, got {pooling!r}")
    if normalize:
        norms = np.linalg.norm(v, axis=-1, keepdims=True)
        v = v / np.where(norms == 0, 1, norms)
    if not np.all(np.isfinite(v)):
        raise BadObject("the embedding holds NaN or infinite values")
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
