import hashlib

import numpy as np
import pytest
import torch

from consumers.errors import Poison
from consumers.objects import verify_and_decode
from consumers.vectors import POINT_ID_NAMESPACE, point_id, pool
from publisher.sidecar.encode import encode_embedding
from schemas.objects import BadObject, read_object


def obj(arr: torch.Tensor, dtype="float32"):
    e = encode_embedding(arr, mm_hash="h", modality="image", model="m", storage_dtype=dtype)
    item = {"uri": "s3://b/k", "sha256": e.sha256, "size_bytes": len(e.data), "dtype": dtype, "shape": list(e.shape)}
    return e.data, item


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_decode_matches_torch_without_torch(dtype):
    t = torch.randn(5, 12)
    data, item = obj(t, dtype)
    got = verify_and_decode(item, data)
    want = t.to(getattr(torch, dtype)).float().numpy()
    assert got.dtype == np.float32 and got.shape == (5, 12)
    np.testing.assert_array_equal(got, want)  # widening is exact


def test_pooling_modes():
    x = np.array([[1, -2, 3], [3, 0, -1]], np.float32)
    np.testing.assert_allclose(pool(x, "mean", False), [2, -1, 1])
    np.testing.assert_allclose(pool(x, "first", False), [1, -2, 3])
    np.testing.assert_allclose(pool(x, "max", False), [3, 0, 3])
    np.testing.assert_allclose(pool(x, "none", False), x)
    n = pool(x, "mean", True)
    assert np.linalg.norm(n) == pytest.approx(1.0)
    np.testing.assert_allclose(np.linalg.norm(pool(x, "none", True), axis=1), [1, 1], rtol=1e-6)
    assert not np.isnan(pool(np.zeros((2, 3), np.float32), "mean", True)).any()  # zero vector stays zero


@pytest.mark.parametrize("change,kind", [
    ({"sha256": "0" * 64}, "checksum_mismatch"),
    ({"size_bytes": 1}, "checksum_mismatch"),
    ({"dtype": "float16"}, "bad_object"),
    ({"shape": [4, 12]}, "bad_object"),
])
def test_object_that_differs_from_the_event_is_poison(change, kind):
    data, item = obj(torch.randn(5, 12))
    with pytest.raises(Poison) as e:
        verify_and_decode({**item, **change}, data)
    assert e.value.kind == kind and "s3://b/k" in str(e.value)


def test_not_safetensors_is_poison():
    data = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      rest"
    item = {"uri": "u", "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), "dtype": "float32",
            "shape": [1, 1]}
    with pytest.raises(Poison) as e:
        verify_and_decode(item, data)
    assert e.value.kind == "bad_object"
    with pytest.raises(BadObject):
        read_object(b"short")


def test_point_ids_are_deterministic_uuid5():
    import uuid

    a = point_id("0b8a5e0e-1111-4a4a-9c9c-123456789abc", 1)
    assert a == point_id("0b8a5e0e-1111-4a4a-9c9c-123456789abc", 1)
    assert a != point_id("0b8a5e0e-1111-4a4a-9c9c-123456789abc", 0)
    assert uuid.UUID(a).version == 5
    assert a == str(uuid.uuid5(POINT_ID_NAMESPACE, "0b8a5e0e-1111-4a4a-9c9c-123456789abc/1"))
