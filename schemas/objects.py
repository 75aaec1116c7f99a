"""The stored object: one media item's encoder output as safetensors, its metadata and its key.

An object holds one tensor, ``embedding``, of shape (num_features, hidden_size), plus
``__metadata__`` (all strings, as safetensors requires) describing where it came from:
``format``, ``mm_hash``, ``modality``, ``model``, ``dtype``, ``encoder_dtype``, ``shape``,
``source``. Where the model needs more than the embedding to use it again (Qwen2-VL's
``image_grid_thw``, a video's ``video_grid_thw``), those small tensors follow it under their
own names, listed in ``__metadata__["extra_tensors"]`` (a JSON list; absent when there are
none, so such objects are byte-identical to the first format's). ``input_digest``, when present,
is a digest of the processed input the encoder ran on (a publisher with ``reuse_stored_embeddings``
records it): a reader that has the same input can prove the object is its encoder output.
Keys are content-addressed: ``<prefix>/<model slug>/<dtype>/<mm_hash>.safetensors``.

Written here (``encode_object``) and read here (``read_object``), with numpy only: the
publisher's torch side and the torch-free consumer share the layout and its checks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT = "vllm-mm-events/1"
TENSOR_NAME = "embedding"
CONTENT_TYPE = "application/vnd.safetensors"
# storage dtype (as events and configs name it) -> (safetensors' name, numpy dtype of the raw bytes).
# numpy has no bfloat16: its raw form is uint16, widened to float32 by shifting.
DTYPES: dict[str, tuple[str, np.dtype]] = {
    "float32": ("F32", np.dtype("<f4")),
    "float16": ("F16", np.dtype("<f2")),
    "bfloat16": ("BF16", np.dtype("<u2")),
}
_BY_ST_NAME = {st: (name, np_dtype) for name, (st, np_dtype) in DTYPES.items()}
# Extra tensors: small integer or float arrays the processor made beside the media (grids, lengths).
EXTRA_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "int64": ("I64", np.dtype("<i8")),
    "int32": ("I32", np.dtype("<i4")),
    "float64": ("F64", np.dtype("<f8")),
    "float32": ("F32", np.dtype("<f4")),
    "bool": ("BOOL", np.dtype("|b1")),
}
_EXTRA_BY_ST_NAME = {st: np_dtype for st, np_dtype in EXTRA_DTYPES.values()}
MAX_EXTRAS = 8  # per object; a reader refuses more
MAX_EXTRA_VALUES = 4096  # per extra tensor
EXTRAS_KEY = "extra_tensors"  # in __metadata__: a JSON list of names
STORE_EXTRAS_KEY = "extras"  # in the store's object metadata (an HTTP header on S3): comma-separated names
_EXTRA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
_SAFE_HASH = re.compile(r"[A-Za-z0-9._-]{1,200}")


class BadObject(ValueError):
    """Bytes that are not an embedding object of this format."""


# ---- keys ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)  # on vLLM's loops for every new item's key: a regex and a hash each time
def model_slug(model: str) -> str:
    """A readable, collision-safe path segment for a model name or path.

    A hub id keeps its organisation: ``llava-hf/llava-1.5-7b-hf`` ->
    ``llava-hf--llava-1.5-7b-hf-3f2a9c1e``. A local path keeps only its last component:
    ``/root/.cache/models/tiny-llava`` -> ``tiny-llava-<hash>`` (where a model sits on one
    machine says nothing to a reader on another). The hash, of the whole name, keeps two
    models whose names sanitize alike (or two local copies) apart.
    """
    name = model.strip()
    if name.startswith(("/", "./", "../", "~")) or name.rstrip("/").count("/") > 1:
        readable = name.rstrip("/").rsplit("/", 1)[-1]
    else:
        readable = name.strip("/").replace("/", "--")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", readable).strip("-.")[-80:]
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{readable or 'model'}-{digest}"


def object_key(prefix: str, model: str, mm_hash: str, storage_dtype: str) -> str:
    """Content-addressed key: the same item under the same model (and dtype) is one object."""
    if not _SAFE_HASH.fullmatch(mm_hash):
        # vLLM's mm_hash is hex; a user-supplied uuid may be anything, so never let it shape a path.
        mm_hash = "h-" + hashlib.sha256(mm_hash.encode()).hexdigest()
    parts = [p for p in (prefix.strip("/"), model_slug(model), storage_dtype, f"{mm_hash}.safetensors") if p]
    return "/".join(parts)


# ---- writing ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodedObject:
    data: bytes
    sha256: str
    dtype: str
    shape: tuple[int, ...]
    extra_tensors: tuple[str, ...] = ()

    def object_metadata(self) -> dict[str, str]:
        """What the store keeps beside the bytes, so a reader can verify without downloading."""
        meta = {"sha256": self.sha256, "dtype": self.dtype, "shape": shape_str(self.shape)}
        if self.extra_tensors:
            meta[STORE_EXTRAS_KEY] = ",".join(self.extra_tensors)
        return meta


def check_extras(extras: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Name-sorted little-endian copies of ``extras``; ValueError naming the first one that cannot be stored."""
    if len(extras) > MAX_EXTRAS:
        raise ValueError(f"extra tensors: {len(extras)} given, at most {MAX_EXTRAS}")
    out = {}
    for name in extras:
        if not isinstance(name, str) or not _EXTRA_NAME.fullmatch(name) or name == TENSOR_NAME:
            raise ValueError(f"extra tensor name {name!r}: expected {_EXTRA_NAME.pattern}, not {TENSOR_NAME!r}")
    for name in sorted(extras):
        a = np.asarray(extras[name])
        kind = a.dtype.name
        if kind not in EXTRA_DTYPES:
            raise ValueError(f"extra tensor {name}: dtype {a.dtype} is not one of {', '.join(EXTRA_DTYPES)}")
        if a.size > MAX_EXTRA_VALUES:
            raise ValueError(f"extra tensor {name}: {a.size} values, at most {MAX_EXTRA_VALUES}")
        out[name] = np.ascontiguousarray(a, dtype=EXTRA_DTYPES[kind][1])
    return out


def encode_object(raw: bytes | memoryview, *, storage_dtype: str, shape: Sequence[int], mm_hash: str,
                  modality: str, model: str, encoder_dtype: str, source: str = "ENCODER",
                  extras: Mapping[str, np.ndarray] | None = None, input_digest: str | None = None) -> EncodedObject:
    """Little-endian tensor bytes of ``storage_dtype`` -> the object (safetensors bytes + its SHA-256).

    The format is an 8-byte little-endian header length, a JSON header (padded to 8 bytes),
    the raw tensor bytes, then each extra tensor's bytes (``extras``, by name). Written directly
    rather than through the safetensors library, which costs ~10x more per small tensor; the
    tests read every object back with it.
    """
    if storage_dtype not in DTYPES:
        raise ValueError(f"storage_dtype: expected one of {', '.join(DTYPES)}, got {storage_dtype!r}")
    shape = [int(d) for d in shape]
    if len(shape) != 2:
        raise ValueError(f"embedding: expected a 2-D (num_features, hidden_size) tensor, got shape {shape}")
    st_name, np_dtype = DTYPES[storage_dtype]
    if len(raw) != shape[0] * shape[1] * np_dtype.itemsize:
        raise ValueError(f"embedding: {len(raw)} bytes do not hold a {storage_dtype} tensor of shape {shape}")
    meta = {
        "format": FORMAT,
        "mm_hash": mm_hash,
        "modality": modality,
        "model": model,
        "dtype": storage_dtype,
        "encoder_dtype": encoder_dtype,
        "shape": shape_str(shape),
        "source": source,
    }
    if input_digest:
        meta["input_digest"] = input_digest
    tensors: dict[str, Any] = {TENSOR_NAME: {"dtype": st_name, "shape": shape, "data_offsets": [0, len(raw)]}}
    parts = [raw]
    extra = check_extras(extras or {})
    if extra:
        meta[EXTRAS_KEY] = json.dumps(list(extra))
        end = len(raw)
        for name, a in extra.items():
            tensors[name] = {"dtype": EXTRA_DTYPES[a.dtype.name][0],
                             "shape": list(a.shape), "data_offsets": [end, end + a.nbytes]}
            end += a.nbytes
            parts.append(a.tobytes())
    header = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    data = b"".join((struct.pack("<Q", len(header)), header, *parts))
    return EncodedObject(data, hashlib.sha256(data).hexdigest(), storage_dtype, tuple(shape), tuple(extra))


def encode_array(array: np.ndarray, *, storage_dtype: str, mm_hash: str, modality: str, model: str,
                 source: str = "ENCODER", extras: Mapping[str, np.ndarray] | None = None) -> EncodedObject:
    """A numpy (num_features, hidden) array -> object; float32 values are rounded to the storage dtype."""
    a = np.asarray(array)
    if storage_dtype == "bfloat16":  # round to nearest even, as torch does
        bits = np.ascontiguousarray(a, dtype="<f4").view("<u4")
        raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    else:
        raw = np.ascontiguousarray(a, dtype=DTYPES[storage_dtype][1])
    return encode_object(raw.tobytes(), storage_dtype=storage_dtype, shape=a.shape, mm_hash=mm_hash,
                         modality=modality, model=model, encoder_dtype=str(a.dtype), source=source, extras=extras)


def extras_from_store_metadata(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The extra tensors' names an object's store metadata lists (none for objects without)."""
    names = tuple(n for n in metadata.get(STORE_EXTRAS_KEY, "").split(",") if n)
    return names if len(names) <= MAX_EXTRAS and all(_EXTRA_NAME.fullmatch(n) for n in names) else ()


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"  # == json.dumps(list(shape))


# ---- reading ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredTensor:
    """An object's tensor as stored: raw little-endian values (bfloat16 as uint16) and what describes them."""

    raw: np.ndarray  # shaped, read-only view on the object's bytes
    dtype: str  # storage dtype name: float32, float16 or bfloat16
    metadata: dict[str, str]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> small array (a copy)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    def to_float32(self) -> np.ndarray:
        """The values as a float32 array (bfloat16 widened exactly)."""
        if self.dtype == "bfloat16":
            return (self.raw.astype(np.uint32) << 16).view(np.float32)
        return self.raw.astype(np.float32)


def _header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    if len(data) < 8:
        raise BadObject("not a safetensors object: shorter than its 8-byte header length")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n <= 0 or 8 + n > len(data):
        raise BadObject("not a safetensors object: bad header length")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than any header is
        raise BadObject(f"not a safetensors object: header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise BadObject("not a safetensors object: header is not a JSON object")
    return header, 8 + n


def read_metadata(data: bytes | memoryview) -> dict[str, str]:
    """The safetensors ``__metadata__`` block, read from the header alone."""
    header, _ = _header(data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise BadObject("not a safetensors object: __metadata__ is not a mapping")
    return dict(meta)


def read_object(data: bytes | memoryview) -> StoredTensor:
    """Object bytes -> its ``embedding`` tensor (a view, no copy) and metadata; BadObject if malformed."""
    header, body_at = _header(data)
    try:
        spec = header[TENSOR_NAME]
        dtype, np_dtype = _BY_ST_NAME[spec["dtype"]]
        begin, end = (int(x) for x in spec["data_offsets"])
        shape = tuple(int(d) for d in spec["shape"])
    except KeyError as e:
        found = sorted(k for k in header if k != "__metadata__")
        raise BadObject(f"not an embedding object: no {e} in its safetensors header (tensors: {found})") from None
    except (ValueError, TypeError, OverflowError) as e:  # OverflowError: a JSON 1e999 is inf
        raise BadObject(f"not an embedding object: bad safetensors header ({e!r})") from None
    count = math.prod(shape)  # Python ints: an absurd shape cannot wrap around
    if min(shape, default=1) < 0 or begin < 0 or end - begin != count * np_dtype.itemsize \
            or body_at + end > len(data):
        raise BadObject(f"tensor bytes [{begin}, {end}) do not hold shape {list(shape)} of {dtype} "
                        f"in an object of {len(data)} bytes")
    raw = _view(data, np_dtype, count, body_at + begin, shape, TENSOR_NAME)
    meta = header.get("__metadata__") or {}
    meta = dict(meta) if isinstance(meta, dict) else {}
    return StoredTensor(raw, dtype, meta, _read_extras(header, meta, data, body_at, end))


def _view(data: bytes | memoryview, np_dtype: np.dtype, count: int, offset: int, shape: tuple[int, ...],
          name: str) -> np.ndarray:
    """The tensor's bytes as an array of its shape; BadObject where numpy cannot hold the shape (a dimension
    past 2**63 with another of 0, more dimensions than numpy's 64): a ValueError escaped before."""
    try:
        return np.frombuffer(data, dtype=np_dtype, count=count, offset=offset).reshape(shape)
    except ValueError as e:
        raise BadObject(f"tensor {name!r}: shape {str(list(shape))[:200]} cannot be held ({e})") from None


def _read_extras(header: dict[str, Any], meta: dict, data: bytes | memoryview, body_at: int,
                 embedding_end: int) -> dict[str, np.ndarray]:
    """Every tensor besides ``embedding``, checked as the writer lays them out: named as the metadata
    lists them, each within bounds, after the embedding and overlapping nothing; each one copied."""
    names = [k for k in header if k not in ("__metadata__", TENSOR_NAME)]
    if len(names) > MAX_EXTRAS:
        raise BadObject(f"not an embedding object: {len(names)} extra tensors, at most {MAX_EXTRAS}")
    listed = meta.get(EXTRAS_KEY)
    if names or listed is not None:
        try:
            declared = json.loads(listed) if isinstance(listed, str) else None
        except (ValueError, RecursionError):  # as in _header: nested past any list the writer makes
            declared = None
        if declared != sorted(names) or not all(_EXTRA_NAME.fullmatch(n) for n in names):
            raise BadObject(f"extra tensors {[n[:64] for n in sorted(names)]} are not those __metadata__ lists "
                            f"({str(listed)[:200]!r}), or not valid names")
    spans, out = [], {}
    for name in names:
        spec = header[name]
        try:
            offsets, dims = spec["data_offsets"], spec["shape"]
            if not (isinstance(offsets, list) and len(offsets) == 2 and isinstance(dims, list)):
                raise TypeError("data_offsets must be [begin, end] and shape a list")
            np_dtype = _EXTRA_BY_ST_NAME[spec["dtype"]]
            begin, end = (int(x) for x in offsets)
            shape = tuple(int(d) for d in dims)
        except (KeyError, ValueError, TypeError, OverflowError) as e:
            raise BadObject(f"extra tensor {name!r}: bad or unsupported header entry ({e!r})") from None
        count = math.prod(shape)
        if min(shape, default=1) < 0 or count > MAX_EXTRA_VALUES or begin < embedding_end \
                or end - begin != count * np_dtype.itemsize or body_at + end > len(data):
            raise BadObject(f"extra tensor {name!r}: bytes [{begin}, {end}) do not hold shape {list(shape)} (at "
                            f"most {MAX_EXTRA_VALUES} values) after the embedding in an object of {len(data)} bytes")
        spans.append((begin, end, name))
        out[name] = _view(data, np_dtype, count, body_at + begin, shape, name).copy()
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise BadObject(f"extra tensors {a!r} and {b!r} overlap")
    return out
