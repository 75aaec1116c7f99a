import hashlib
import json

import pytest
import torch

from publisher.loader import decode_embedding
from publisher.sidecar.encode import encode_embedding
from schemas.objects import model_slug, object_key, read_metadata


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_and_metadata(dtype):
    t = torch.randn(16, 128, dtype=torch.bfloat16)
    obj = encode_embedding(t, mm_hash="abc123", modality="image", model="m/x", storage_dtype=dtype)
    assert obj.sha256 == hashlib.sha256(obj.data).hexdigest()
    assert obj.shape == (16, 128) and obj.dtype == dtype
    back, meta = decode_embedding(obj.data)
    assert back.dtype == getattr(torch, dtype) and back.shape == (16, 128)
    assert torch.allclose(back.float(), t.float(), atol=1e-2)
    assert meta["mm_hash"] == "abc123" and meta["modality"] == "image" and meta["model"] == "m/x"
    assert meta["dtype"] == dtype and meta["encoder_dtype"] == "bfloat16" and meta["source"] == "ENCODER"
    assert json.loads(meta["shape"]) == [16, 128]
    assert read_metadata(obj.data) == meta
    assert obj.object_metadata() == {"sha256": obj.sha256, "dtype": dtype, "shape": "[16, 128]"}


def test_float32_is_exact():
    t = torch.randn(5, 7)
    back, _ = decode_embedding(encode_embedding(t, mm_hash="h", modality="audio", model="m",
                                                storage_dtype="float32").data)
    assert torch.equal(back, t)


def test_rejects_device_and_rank_errors():
    with pytest.raises(ValueError, match="2-D"):
        encode_embedding(torch.zeros(3), mm_hash="h", modality="image", model="m", storage_dtype="float32")
    with pytest.raises(ValueError, match="storage_dtype"):
        encode_embedding(torch.zeros(2, 2), mm_hash="h", modality="image", model="m", storage_dtype="int8")
    with pytest.raises(ValueError, match="not a safetensors object"):
        read_metadata(b"\x01\x02")


def test_keys_are_content_addressed():
    a = object_key("p/q", "llava-hf/llava-1.5-7b-hf", "ff00", "float32")
    assert a == object_key("p/q", "llava-hf/llava-1.5-7b-hf", "ff00", "float32")
    assert a.startswith("p/q/llava-hf--llava-1.5-7b-hf-") and a.endswith("/float32/ff00.safetensors")
    assert a != object_key("p/q", "other/model", "ff00", "float32")
    assert a != object_key("p/q", "llava-hf/llava-1.5-7b-hf", "ff00", "float16")
    assert a != object_key("p/q", "llava-hf/llava-1.5-7b-hf", "ff01", "float32")
    assert object_key("", "m", "ff", "float32").count("/") == 2  # no empty segments


def test_slug_keeps_similar_names_apart_and_paths_safe():
    assert model_slug("a/b") != model_slug("a-b")  # sanitize alike, hash differs
    assert "/" not in model_slug("/tmp/models/x")
    # A hub id keeps its organisation; a local path only its last component (plus the hash of the whole).
    assert model_slug("llava-hf/llava-1.5-7b-hf").startswith("llava-hf--llava-1.5-7b-hf-")
    assert model_slug("/root/.cache/vllm-mm-events/models/tiny-llava").startswith("tiny-llava-")
    assert model_slug("./models/tiny-llava/").startswith("tiny-llava-")
    assert model_slug("/a/tiny-llava") != model_slug("/b/tiny-llava")
    evil = object_key("", "m", "../../etc/passwd", "float32")
    assert ".." not in evil and evil.endswith(".safetensors")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_stores_the_encoder_output_exactly(dtype):
    """storage_dtype resolved from the model's dtype: the stored bytes are the tensor's own bytes."""
    from publisher.config import resolve_storage_dtype

    t = torch.randn(16, 128).to(dtype)
    name = resolve_storage_dtype("native", dtype)
    obj = encode_embedding(t, mm_hash="h", modality="image", model="m", storage_dtype=name)
    assert obj.dtype == name
    assert obj.data.endswith(t.view(torch.uint8).numpy().tobytes())  # no conversion: the same bits
    back, meta = decode_embedding(obj.data)
    assert back.dtype == dtype and torch.equal(back, t) and meta["encoder_dtype"] == meta["dtype"] == name


def test_an_output_in_another_dtype_is_converted_so_the_key_never_lies():
    """The key says bfloat16 (the model's dtype); an encoder that emitted float32 is cast, and the
    object records what the encoder produced."""
    t = torch.randn(4, 8)
    obj = encode_embedding(t, mm_hash="h", modality="image", model="m", storage_dtype="bfloat16")
    back, meta = decode_embedding(obj.data)
    assert obj.dtype == meta["dtype"] == "bfloat16" and meta["encoder_dtype"] == "float32"
    assert torch.equal(back, t.to(torch.bfloat16))
