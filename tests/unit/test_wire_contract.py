"""The wire contract's object format and URI forms (``schemas``), checked against independent readers."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load

from publisher.sidecar.encode import encode_embedding
from publisher.stores.local import LocalDirStore
from schemas.objects import BadObject, encode_array, extras_from_store_metadata, read_object
from schemas.uris import StoreLocation, object_uri, split_object_uri


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_numpy_writer_equals_the_torch_writer_and_safetensors_reads_both(dtype):
    a = np.random.default_rng(3).standard_normal((6, 10)).astype(np.float32)
    by_numpy = encode_array(a, storage_dtype=dtype, mm_hash="h", modality="image", model="m")
    by_torch = encode_embedding(torch.from_numpy(a), mm_hash="h", modality="image", model="m", storage_dtype=dtype)
    assert by_numpy.data == by_torch.data and by_numpy.sha256 == by_torch.sha256  # bf16 rounds as torch does
    stored = read_object(by_numpy.data)
    assert stored.dtype == dtype and stored.shape == (6, 10) and stored.metadata["mm_hash"] == "h"
    want = torch.from_numpy(a).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(stored.to_float32(), want)
    if dtype != "bfloat16":  # the safetensors library (numpy flavour) has no bfloat16
        np.testing.assert_array_equal(st_load(by_numpy.data)["embedding"], stored.raw)


@pytest.mark.parametrize("mangle", [
    lambda d: d[:-1],  # truncated tensor bytes
    lambda d: d[:8] + b"[" + d[9:],  # header is not a JSON object
    lambda d: (10 ** 9).to_bytes(8, "little") + d[8:],  # header length past the end
    lambda d: d.replace(b'"embedding"', b'"something"', 1),  # no tensor named embedding
    lambda d: d.replace(b'"shape":[2,3]', b'"shape":[3,3]', 1),  # shape does not fit the bytes
])
def test_malformed_objects_are_refused(mangle):
    data = encode_array(np.ones((2, 3), np.float32), storage_dtype="float32", mm_hash="h", modality="image",
                        model="m").data
    read_object(data)
    with pytest.raises(BadObject):
        read_object(mangle(data))


def safetensors(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body


@pytest.mark.parametrize("spec", [
    {"dtype": "F32", "shape": [0, 10 ** 30], "data_offsets": [0, 0]},  # no bytes, a dimension numpy cannot hold
    {"dtype": "F32", "shape": [1] * 70, "data_offsets": [0, 4]},  # more dimensions than numpy's 64
])
def test_shapes_numpy_cannot_hold_are_refused_as_bad_objects(spec):
    """A ValueError escaped: the consumer took it for a crash, not a poison event, and stopped on it at
    every restart."""
    body = b"\0" * spec["data_offsets"][1]
    with pytest.raises(BadObject, match="cannot be held"):
        read_object(safetensors({"embedding": spec, "__metadata__": {}}, body))
    extra = {"embedding": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]},
             "grid": {**spec, "dtype": "I64", "data_offsets": [4, 4 + 2 * spec["data_offsets"][1]]},
             "__metadata__": {"extra_tensors": '["grid"]'}}
    with pytest.raises(BadObject, match="cannot be held"):
        read_object(safetensors(extra, b"\0" * (4 + 2 * spec["data_offsets"][1])))


def test_an_extras_list_nested_past_json_limits_is_a_bad_object():
    """The header's own JSON was guarded against nesting; the extras list inside it, a string parsed
    again, was not: its RecursionError escaped, and the consumer stopped on that object at every restart."""
    obj = {"embedding": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]},
           "__metadata__": {"extra_tensors": "[" * 100_000}}
    with pytest.raises(BadObject, match="not those __metadata__ lists"):
        read_object(safetensors(obj, b"\0" * 4))


GRID = {"image_grid_thw": np.array([[1, 4, 6]]), "second_per_grid_ts": np.array([0.5], np.float32),
        "mask": np.array([True, False])}


def test_extra_tensors_ride_beside_the_embedding_and_safetensors_reads_them():
    a = np.random.default_rng(4).standard_normal((6, 10)).astype(np.float32)
    obj = encode_embedding(torch.from_numpy(a), mm_hash="h", modality="image", model="m", storage_dtype="float32",
                           extras=GRID)
    assert obj.extra_tensors == ("image_grid_thw", "mask", "second_per_grid_ts")  # by name
    assert obj.object_metadata()["extras"] == "image_grid_thw,mask,second_per_grid_ts"
    assert extras_from_store_metadata(obj.object_metadata()) == obj.extra_tensors
    independent = st_load(obj.data)
    assert set(independent) == {"embedding", *GRID}
    stored = read_object(obj.data)
    assert json.loads(stored.metadata["extra_tensors"]) == list(obj.extra_tensors)
    np.testing.assert_array_equal(stored.raw, a)
    for name, want in GRID.items():
        np.testing.assert_array_equal(independent[name], want)
        np.testing.assert_array_equal(stored.extras[name], want)
        assert stored.extras[name].dtype == want.dtype
    # Without extras the object is byte for byte the first format's: no extras key anywhere.
    plain = encode_array(a, storage_dtype="float32", mm_hash="h", modality="image", model="m")
    assert b"extra" not in plain.data and "extras" not in plain.object_metadata()
    assert read_object(plain.data).extras == {}
    assert extras_from_store_metadata({"extras": "a,../b"}) == ()  # a forged header names nothing


@pytest.mark.parametrize("extras, message", [
    ({"embedding": np.zeros(2)}, "name"),
    ({"../x": np.zeros(2)}, "name"),
    ({"big": np.zeros(5000)}, "at most 4096"),
    ({"half": np.zeros(2, np.float16)}, "dtype"),
    ({f"e{i}": np.zeros(1) for i in range(9)}, "at most 8"),
])
def test_extras_the_format_cannot_hold_are_refused_by_name(extras, message):
    with pytest.raises(ValueError, match=message):
        encode_array(np.ones((2, 3), np.float32), storage_dtype="float32", mm_hash="h", modality="image", model="m",
                     extras=extras)


@pytest.mark.parametrize("mangle", [
    lambda d: d.replace(b'"I64"', b'"I8"', 1),  # a dtype extras never have
    lambda d: d.replace(b'"shape":[1,3]', b'"shape":[1,4]', 1),  # shape does not fit its bytes
    lambda d: d.replace(b'"shape":[1,3]', b'"shape":[1,-3]', 1),
    lambda d: d[:-1],  # truncated
])
def test_malformed_extras_are_refused(mangle):
    data = encode_array(np.ones((2, 3), np.float32), storage_dtype="float32", mm_hash="h", modality="image",
                        model="m", extras={"image_grid_thw": np.array([[1, 2, 2]])}).data
    read_object(data)
    with pytest.raises(BadObject):
        read_object(mangle(data))


def test_one_uri_form_for_every_writer_and_reader(tmp_path):
    root = tmp_path / "dir with space"
    key = "m/float32/ü h.safetensors"
    uri = LocalDirStore(root).uri(key)
    assert uri == StoreLocation.parse(root.as_uri()).uri(key) == object_uri("file", str(root), key)
    scheme, parent, name = split_object_uri(uri)
    assert (scheme, f"{parent}/{name}") == ("file", f"{root}/{key}")
    assert StoreLocation.parse("s3://bucket/pre/fix").uri("pre/fix/k") == "s3://bucket/pre/fix/k"
    assert split_object_uri("s3://bucket/pre/fix/k") == ("s3", "bucket", "pre/fix/k")
    for bad in ("http://x/y", "s3://bucket", "file://host/x", "file:///dir/", "s3://b/k?versionId=1", "s3://b/k#f",
                "s3://b/a/../k", "s3://b/./k", "file:///dir/x%00y", "s3://b/k\x00",
                "s3://b/" + "k" * 1025, "file:///dir/" + "x" * 256, "file://" + "/d" * 2049):
        with pytest.raises(ValueError, match="uri"):
            split_object_uri(bad)
