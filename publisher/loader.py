"""``load_mm_embeddings``: what a caller does with ``ec_transfer_params``.

Returns the stored encoder outputs as CPU tensors, one per media item, in prompt order:
what the original design returned as ``CompletionOutput.mm_embedding``. The params name
everything needed except credentials (the standard AWS chain supplies those). Reads go
through the one read path (``publisher.stores.reader``) and the one object reader
(``schemas.objects``); torch is only the view on top.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from publisher.config import default_data_dir
from publisher.stores.base import ObjectNotFound
from publisher.stores.reader import DEFAULT_MAX_OBJECT_BYTES, ObjectReader
from schemas.objects import read_object


def default_objects_uri() -> str:
    """The publisher's default object directory (its embedded default store)."""
    return (default_data_dir() / "objects").as_uri()


class EmbeddingNotAvailable(TimeoutError):
    """An object named in ec_transfer_params did not appear in the store in time."""


def decode_embedding(data: bytes, extras: dict | None = None):
    """Object bytes -> (CPU tensor in the stored dtype, ``__metadata__``); the object's extra tensors
    (``image_grid_thw``, ...) are put into ``extras`` as CPU tensors when it is given."""
    import torch

    stored = read_object(data)
    if extras is not None:
        extras.update({name: torch.from_numpy(a) for name, a in stored.extras.items()})
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[stored.dtype]
    raw = stored.raw.reshape(-1).view("u1")
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(stored.shape) \
        if raw.size else torch.empty(stored.shape, dtype=dtype)
    return tensor, stored.metadata


MAX_ITEMS = 1024  # media items one response may name: far past any prompt's (vLLM's limit_mm_per_prompt)
MAX_TOTAL_BYTES = 4 << 30  # of objects read for one response


def load_mm_embeddings(output: Any, timeout: float = 30.0, *, endpoint_url: str | None = None,
                       allowed_endpoints: Iterable[str] = (), local_dirs: Iterable[str] | None = None,
                       max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES,
                       with_extras: bool = False) -> list:
    """``RequestOutput`` or its ``ec_transfer_params`` dict -> list of CPU tensors.

    ``with_extras=True`` gives ``(tensor, extras)`` pairs instead, ``extras`` mapping each extra
    tensor stored beside the embedding (Qwen2-VL's ``image_grid_thw``, ...) to a CPU tensor.

    Text-only outputs (no params, or no items) give ``[]``. An object still being uploaded
    is waited for up to ``timeout`` seconds; then ``EmbeddingNotAvailable`` is raised.

    The params come from a server's response, so they choose nothing security-relevant:
    S3 requests (signed with the caller's credentials) go to ``endpoint_url`` (else the
    standard ``AWS_ENDPOINT_URL``); an ``s3_endpoint_url`` in the params is used only if it is
    one of ``allowed_endpoints``. ``file://`` objects are read only under ``local_dirs``
    (default: the publisher's default object directory); reads are capped at ``max_object_bytes``
    each and ``max_total_bytes`` in all (an object named twice, as an image given twice is, is read
    once and counted each time), and the params may name at most ``MAX_ITEMS`` items.
    """
    params = output if isinstance(output, Mapping) or output is None else getattr(output, "ec_transfer_params", None)
    if not params:
        return []
    if params.get("error"):
        raise ValueError(f"the request was refused: {params['error']}")
    refs = params.get("mm_embeddings") or []
    if not isinstance(refs, list) or len(refs) > MAX_ITEMS or not all(
            isinstance(r, Mapping) and type(r.get("item_index")) is int and isinstance(r.get("mm_hash"), str)
            and isinstance(r.get("uri", ""), str) for r in refs):
        raise ValueError(f"mm_embeddings: expected a list of at most {MAX_ITEMS} items, each with an int "
                         "item_index, a string mm_hash and uri")
    refs = sorted(refs, key=lambda r: r["item_index"])
    if any("uri" not in r for r in refs):
        raise ValueError("these params name no object locations (the server runs with return_params=ids); "
                         "read the embeddings from the event instead")
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    offered = params.get("s3_endpoint_url")
    if offered and offered != endpoint:
        if offered not in set(allowed_endpoints):
            raise ValueError(f"the params name S3 endpoint {offered!r}, which is not one you allowed: pass "
                             "endpoint_url= (or AWS_ENDPOINT_URL) or list it in allowed_endpoints=")
        endpoint = offered
    dirs = [default_objects_uri()] if local_dirs is None else [Path(d).resolve().as_uri() for d in local_dirs]
    deadline = time.monotonic() + timeout
    tensors, decoded, total = [], {}, 0
    with ObjectReader(dirs, endpoint, max_bytes=max_object_bytes, any_bucket=True) as reader:
        for ref in refs:
            uri = ref["uri"]
            data = None if uri in decoded else _get_when_ready(reader, uri, deadline, timeout)
            total += decoded[uri][0] if data is None else len(data)
            if total > max_total_bytes:
                raise ValueError(f"the params name {len(refs)} items of more than max_total_bytes={max_total_bytes} "
                                 "in all; pass a larger max_total_bytes if that is expected")
            if data is None:  # an image given twice: one object, read once, a tensor of its own each time
                _, tensor, meta, extras = decoded[uri]
                tensor, extras = tensor.clone(), {k: v.clone() for k, v in extras.items()}
            else:
                extras = {}
                tensor, meta = decode_embedding(data, extras)
                decoded[uri] = (len(data), tensor, meta, extras)
                del data
            if meta.get("mm_hash", ref["mm_hash"]) != ref["mm_hash"]:
                raise ValueError(f"{uri}: holds mm_hash {meta.get('mm_hash')!r}, expected {ref['mm_hash']!r}")
            tensors.append((tensor, extras) if with_extras else tensor)
    return tensors


def _get_when_ready(reader: ObjectReader, uri: str, deadline: float, timeout: float) -> bytes:
    delay = 0.01
    while True:
        try:
            return reader.get(uri)
        except ObjectNotFound:
            if time.monotonic() >= deadline:
                raise EmbeddingNotAvailable(
                    f"{uri} is not in the object store after {timeout:.1f}s; the upload may still be "
                    f"running or may have been dropped (see the publisher's logs)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
