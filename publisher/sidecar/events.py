"""A finished request's snapshot -> the ``MMEmbeddingEvent`` record (encoding is ``schemas.codec``).

Nothing here knows vLLM: ``publisher.vllm.connector`` turns a vLLM ``Request`` into a
``FinishedRequest`` snapshot, so this module is tested without an engine.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class MediaItem:
    mm_hash: str
    modality: str
    item_index: int
    placeholder_offset: int
    placeholder_length: int
    source: str = "ENCODER"  # or CLIENT: the caller sent embeddings, no encoder ran
    reused: bool = False  # loaded from the store instead of encoded (reuse_stored_embeddings)
    # The request ended (aborted, failed; never preempted) before its placeholder was scheduled: no encoder ran
    # for it here, so its object is checked once (another request may have stored it), not waited for.
    unreached: bool = False


@dataclass(frozen=True)
class FinishedRequest:
    """What the scheduler knew when the request finished: plain values only."""
    request_id: str
    internal_request_id: str
    model: str
    finish_reason: str | None
    stop_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    metadata: dict[str, str]
    items: tuple[MediaItem, ...]
    lora_name: str | None
    arrival_time: float | None  # unix seconds
    finished_time: float  # unix seconds
    traceparent: str | None = None
    tracestate: str | None = None
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class StoredItem:
    """An object the store confirmed durable, with what its head said."""
    uri: str
    sha256: str
    size_bytes: int
    dtype: str
    shape: tuple[int, ...]
    extra_tensors: tuple[str, ...] = ()


def stringify_metadata(extra_args: Mapping[str, Any] | None) -> dict[str, str]:
    """``SamplingParams.extra_args`` -> map<string>: strings as-is, the rest JSON-encoded.

    Whatever vLLM accepted must come out as text (it runs on the scheduler loop, where an exception
    stops the engine): nested maps mixing int and str keys (which cannot be sorted) keep their order,
    and lone surrogates (which UTF-8 cannot hold) become backslash escapes. Nesting past JSON's depth
    still raises (RecursionError): the caller refuses the request."""
    out: dict[str, str] = {}
    for k, v in (extra_args or {}).items():
        out[_utf8(str(k))] = _utf8(v) if isinstance(v, str) else _json(v)
    return out


def _json(v: Any) -> str:
    try:
        return json.dumps(v, sort_keys=True, default=str)
    except TypeError:  # keys of several types
        return json.dumps(v, default=str)


def _utf8(s: str) -> str:
    try:
        s.encode()
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode()


def producer_info(engine_version: str, storage_dtype: str) -> dict[str, str]:
    from publisher.version import __version__

    return {"engine": "vllm", "engine_version": engine_version, "publisher_version": __version__,
            "hostname": socket.gethostname(), "storage_dtype": storage_dtype}


def build_event(req: FinishedRequest, stored: Mapping[str, StoredItem], producer: Mapping[str, str],
                published_time: float | None = None) -> dict[str, Any]:
    """The Avro record. Items whose object is not in ``stored`` go to ``missing_embeddings``."""
    embeddings, missing = [], []
    for item in req.items:
        obj = stored.get(item.mm_hash)
        if obj is None:
            missing.append(item.mm_hash)
            continue
        embeddings.append({
            "mm_hash": item.mm_hash, "modality": item.modality, "item_index": item.item_index,
            "placeholder_offset": item.placeholder_offset, "placeholder_length": item.placeholder_length,
            "uri": obj.uri, "sha256": obj.sha256, "size_bytes": obj.size_bytes, "dtype": obj.dtype,
            "shape": list(obj.shape), "source": item.source, "extra_tensors": list(obj.extra_tensors),
            "reused": item.reused,
        })
    finished_ms = int(req.finished_time * 1000)
    published_time = time.time() if published_time is None else published_time
    trace = None
    if req.traceparent or req.tracestate:
        trace = {"traceparent": req.traceparent, "tracestate": req.tracestate}
    return {
        "event_id": req.event_id,
        "event_time": finished_ms,
        "request_id": req.request_id,
        "internal_request_id": req.internal_request_id,
        "model": req.model,
        "finish_reason": req.finish_reason,
        "stop_reason": req.stop_reason,
        "num_prompt_tokens": req.num_prompt_tokens,
        "num_output_tokens": req.num_output_tokens,
        "metadata": dict(req.metadata),
        "embeddings": embeddings,
        "missing_embeddings": missing,
        "lora_name": req.lora_name,
        "timings": {
            "arrival_time_ms": int(req.arrival_time * 1000) if req.arrival_time else None,
            "finished_time_ms": finished_ms,
            "e2e_latency_ms": (req.finished_time - req.arrival_time) * 1000 if req.arrival_time else None,
            "publish_latency_ms": max(0.0, (published_time - req.finished_time) * 1000),
        },
        "producer": dict(producer),
        "trace": trace,
    }
