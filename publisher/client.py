"""``load_mm_embeddings``: what a caller does with ``ec_transfer_params``.

Returns the stored encoder outputs as CPU tensors, one per media item, in prompt order:
what the original design returned as ``CompletionOutput.mm_embedding``. The params name
everything needed except credentials (the standard AWS chain supplies those).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from publisher.store import ObjectNotFound, ObjectStore, open_object_uri


class EmbeddingNotAvailable(TimeoutError):
    """An object named in ec_transfer_params did not appear in the store in time."""


def load_mm_embeddings(output: Any, timeout: float = 30.0, *, endpoint_url: str | None = None) -> list:
    """``RequestOutput`` or its ``ec_transfer_params`` dict -> list of CPU tensors.

    Text-only outputs (no params, or no items) give ``[]``. An object still being uploaded
    is waited for up to ``timeout`` seconds; then ``EmbeddingNotAvailable`` is raised.
    """
    from publisher.tensors import decode_embedding

    params = output if isinstance(output, Mapping) or output is None else getattr(output, "ec_transfer_params", None)
    if not params:
        return []
    if params.get("error"):
        raise ValueError(f"the request was refused: {params['error']}")
    refs = sorted(params.get("mm_embeddings") or [], key=lambda r: r["item_index"])
    endpoint = endpoint_url or params.get("s3_endpoint_url")
    stores: dict[str, ObjectStore] = {}
    deadline = time.monotonic() + timeout
    tensors = []
    for ref in refs:
        uri = ref["uri"]
        store, key = _open(uri, endpoint, stores)
        tensor, meta = decode_embedding(_get_when_ready(store, key, uri, deadline, timeout))
        if meta.get("mm_hash", ref["mm_hash"]) != ref["mm_hash"]:
            raise ValueError(f"{uri}: holds mm_hash {meta.get('mm_hash')!r}, expected {ref['mm_hash']!r}")
        tensors.append(tensor)
    return tensors


def _open(uri: str, endpoint: str | None, stores: dict[str, ObjectStore]) -> tuple[ObjectStore, str]:
    """One store per bucket or directory: S3 clients are costly to build."""
    root, sep, name = uri.rpartition("/")
    if uri.startswith("s3://"):
        root = "/".join(uri.split("/", 3)[:3])  # s3://bucket
    store = stores.get(root)
    if store is None:
        store, key = open_object_uri(uri, endpoint_url=endpoint)
        stores[root] = store
        return store, key
    return store, uri[len(root) + 1:] if uri.startswith("s3://") else name


def _get_when_ready(store: ObjectStore, key: str, uri: str, deadline: float, timeout: float) -> bytes:
    delay = 0.01
    while True:
        try:
            return store.get(key)
        except ObjectNotFound:
            if time.monotonic() >= deadline:
                raise EmbeddingNotAvailable(
                    f"{uri} is not in the object store after {timeout:.1f}s; the upload may still be "
                    f"running or may have been dropped (see the publisher's logs)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
