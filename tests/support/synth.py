"""Events and objects made with the publisher's own code (store, safetensors, Avro), for
consumer tests that need exact control (poison cases, sizes). The end-to-end tests use
events from the real engine instead."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from publisher.sidecar.events import FinishedRequest, MediaItem, StoredItem, build_event, producer_info
from schemas.objects import encode_array, object_key

MODEL = "tiny/llava-synth"


def make_event(store, prefix: str, request_id: str, features: list[np.ndarray], metadata: dict | None = None,
               modality: str = "image") -> tuple[dict, list[str]]:
    """Stores each (num_features, hidden) array as the publisher would; returns (event, uris)."""
    items, stored, uris = [], {}, []
    for i, f in enumerate(features):
        mm_hash = hashlib.sha256(f.tobytes()).hexdigest()
        obj = encode_array(f, mm_hash=mm_hash, modality=modality, model=MODEL, storage_dtype="float32")
        key = object_key(prefix, MODEL, mm_hash, "float32")
        store.put_if_absent(key, obj.data, obj.object_metadata())
        uri = store.uri(key)
        uris.append(uri)
        items.append(MediaItem(mm_hash, modality, i, 5 + i * 10, f.shape[0]))
        stored[mm_hash] = StoredItem(uri, obj.sha256, len(obj.data), "float32", tuple(f.shape))
    now = time.time()
    req = FinishedRequest(request_id, f"{request_id}-0000abcd", MODEL, "stop", None, 12, 3, dict(metadata or {}),
                          tuple(items), None, now - 0.5, now)
    return build_event(req, stored, producer_info("test", "float32")), uris


def features(seed: int, n: int = 4, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
