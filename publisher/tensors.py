"""Safetensors encoding of one media item's encoder output, and content-addressed keys.

An object holds exactly one tensor, ``embedding``, of shape (num_features, hidden_size), plus
``__metadata__`` (all strings, as safetensors requires) describing where it came from.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load

FORMAT = "vllm-mm-events/1"
TENSOR_NAME = "embedding"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # safetensors' names
_SAFE_HASH = re.compile(r"[A-Za-z0-9._-]{1,200}")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"storage_dtype: expected one of {', '.join(_DTYPES)}, got {name!r}") from None


def model_slug(model: str) -> str:
    """A readable, collision-safe path segment for a model name or path.

    ``llava-hf/llava-1.5-7b-hf`` -> ``llava-hf--llava-1.5-7b-hf-3f2a9c1e``. The hash suffix
    keeps two models whose names sanitize alike (or two local paths) apart.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", model.strip("/").replace("/", "--")).strip("-.")[-80:]
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{readable or 'model'}-{digest}"


def object_key(prefix: str, model: str, mm_hash: str, storage_dtype: str) -> str:
    """Content-addressed key: the same item under the same model (and dtype) is one object."""
    if not _SAFE_HASH.fullmatch(mm_hash):
        # vLLM's mm_hash is hex; a user-supplied uuid may be anything, so never let it shape a path.
        mm_hash = "h-" + hashlib.sha256(mm_hash.encode()).hexdigest()
    parts = [p for p in (prefix.strip("/"), model_slug(model), storage_dtype, f"{mm_hash}.safetensors") if p]
    return "/".join(parts)


@dataclass(frozen=True)
class EncodedObject:
    data: bytes
    sha256: str
    dtype: str
    shape: tuple[int, ...]

    def object_metadata(self) -> dict[str, str]:
        """What the store keeps beside the bytes, so a reader can verify without downloading."""
        return {"sha256": self.sha256, "dtype": self.dtype, "shape": _shape_str(self.shape)}


def encode_embedding(tensor: torch.Tensor, *, mm_hash: str, modality: str, model: str,
                     storage_dtype: str, source: str = "ENCODER") -> EncodedObject:
    """Serialize a host tensor into safetensors bytes. Runs in the worker sidecar.

    The format is an 8-byte little-endian header length, a JSON header (padded to 8 bytes)
    and the raw little-endian tensor bytes. Written directly rather than through
    ``safetensors.torch.save``, which costs ~10x more per small tensor; the tests read
    every object back with the safetensors library.
    """
    if tensor.device.type != "cpu":
        raise ValueError("encode_embedding needs a host tensor; capture copies it off the device first")
    if tensor.dim() != 2:
        raise ValueError(f"embedding: expected a 2-D (num_features, hidden_size) tensor, got shape {tuple(tensor.shape)}")
    out = tensor.to(torch_dtype(storage_dtype)).contiguous()
    shape = list(out.shape)
    raw = out.view(torch.uint8).numpy().tobytes() if out.numel() else b""
    meta = {
        "format": FORMAT,
        "mm_hash": mm_hash,
        "modality": modality,
        "model": model,
        "dtype": storage_dtype,
        "encoder_dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": _shape_str(shape),
        "source": source,
    }
    header = json.dumps({"__metadata__": meta, TENSOR_NAME: {
        "dtype": _ST_DTYPE[storage_dtype], "shape": shape, "data_offsets": [0, len(raw)]}},
        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    data = b"".join((struct.pack("<Q", len(header)), header, raw))
    return EncodedObject(data, hashlib.sha256(data).hexdigest(), storage_dtype, tuple(shape))


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"  # == json.dumps(list(shape))


def decode_embedding(data: bytes) -> tuple[torch.Tensor, dict[str, str]]:
    """Bytes of one object -> (tensor, __metadata__)."""
    tensors = st_load(data)
    if TENSOR_NAME not in tensors:
        raise ValueError(f"object holds no tensor named {TENSOR_NAME!r} (found {sorted(tensors)})")
    return tensors[TENSOR_NAME], read_metadata(data)


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors ``__metadata__`` block, read from the header alone."""
    if len(data) < 8:
        raise ValueError("not a safetensors object: shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("not a safetensors object: bad header length")
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__") or {})
