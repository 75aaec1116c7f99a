"""A captured host tensor -> the stored object (``schemas.objects`` owns the format). Runs in the worker sidecar."""

from __future__ import annotations

import torch

from schemas.objects import DTYPES, EncodedObject, encode_object

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert set(_TORCH_DTYPES) == set(DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"storage_dtype: expected one of {', '.join(_TORCH_DTYPES)}, got {name!r}") from None


def encode_embedding(tensor: torch.Tensor, *, mm_hash: str, modality: str, model: str,
                     storage_dtype: str, source: str = "ENCODER", extras=None,
                     input_digest: str | None = None) -> EncodedObject:
    """Cast a host (num_features, hidden_size) tensor to ``storage_dtype`` and serialize it.

    ``storage_dtype`` is concrete (``native`` is resolved from the model's dtype at engine start,
    and the key already names it): an encoder output in another dtype is converted, so the key
    and the event never lie; in the common case (``native``, output in the model's dtype) the
    cast is a no-op and the bytes are read straight from the ring."""
    if tensor.device.type != "cpu":
        raise ValueError("encode_embedding needs a host tensor; capture copies it off the device first")
    if tensor.dim() != 2:
        raise ValueError("embedding: expected a 2-D (num_features, hidden_size) tensor, "
                         f"got shape {tuple(tensor.shape)}")
    out = tensor.to(torch_dtype(storage_dtype)).contiguous()
    raw = out.view(torch.uint8).reshape(-1).numpy().data if out.numel() else b""  # no copy until the join
    return encode_object(raw, storage_dtype=storage_dtype, shape=tuple(out.shape), mm_hash=mm_hash,
                         modality=modality, model=model, encoder_dtype=str(tensor.dtype).removeprefix("torch."),
                         source=source, extras=extras, input_digest=input_digest)
