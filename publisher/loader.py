"""``load_mm_embeddings``: what a caller does with ``ec_transfer_params``.

Returns the stored encoder outputs as CPU tensors, one per media item, in prompt order:
what the original design returned as ``CompletionOutput.mm_embedding``. The params name
everything needed except credentials (the standard AWS chain supplies those). Reads go
through the one read path (``publisher.stores.reader``) and the one object reader
(``schemas.objects``); torch is only the view on top.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from publisher.stores.base import ObjectNotFound
from publisher.stores.reader import ObjectReader
from schemas.objects import read_object


class EmbeddingNotAvailable(TimeoutError):
    """An object named in ec_transfer_params did not appear in the store in time."""


def decode_embedding(data: bytes):
    """Object bytes -> (CPU tensor in the stored dtype, ``__metadata__``)."""
    import torch

    stored = read_object(data)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[stored.dtype]
    raw = stored.raw.reshape(-1).view("u1")
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(stored.shape) \
        if raw.size else torch.empty(stored.shape, dtype=dtype)
    return tensor, stored.metadata


def load_mm_embeddings(output: Any, timeout: float = 30.0, *, endpoint_url: str | None = None) -> list:
    """``RequestOutput`` or its ``ec_transfer_params`` dict -> list of CPU tensors.

    Text-only outputs (no params, or no items) give ``[]``. An object still being uploaded
    is waited for up to ``timeout`` seconds; then ``EmbeddingNotAvailable`` is raised.
    """
    params = output if isinstance(output, Mapping) or output is None else getattr(output, "ec_transfer_params", None)
    if not params:
        return []
    if params.get("error"):
        raise ValueError(f"the request was refused: {params['error']}")
    refs = sorted(params.get("mm_embeddings") or [], key=lambda r: r["item_index"])
    deadline = time.monotonic() + timeout
    tensors = []
    with ObjectReader(endpoint_url or params.get("s3_endpoint_url")) as reader:
        for ref in refs:
            uri = ref["uri"]
            tensor, meta = decode_embedding(_get_when_ready(reader, uri, deadline, timeout))
            if meta.get("mm_hash", ref["mm_hash"]) != ref["mm_hash"]:
                raise ValueError(f"{uri}: holds mm_hash {meta.get('mm_hash')!r}, expected {ref['mm_hash']!r}")
            tensors.append(tensor)
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
