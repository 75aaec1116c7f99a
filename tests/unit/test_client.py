import threading
import time

import pytest
import torch

from publisher import EmbeddingNotAvailable, load_mm_embeddings
from publisher.sidecar.encode import encode_embedding
from publisher.stores.base import ForbiddenObject, ObjectTooLarge
from publisher.stores.local import LocalDirStore


def params_for(store, hashes):
    return {"mm_embeddings": [{"uri": store.uri(f"m/{h}.safetensors"), "mm_hash": h, "modality": "image",
                               "item_index": i} for i, h in enumerate(hashes)]}


def put(store, h, t):
    o = encode_embedding(t, mm_hash=h, modality="image", model="m", storage_dtype="float32")
    store.put_if_absent(f"m/{h}.safetensors", o.data, o.object_metadata())


def test_text_only_gives_empty_list():
    assert load_mm_embeddings(None) == [] and load_mm_embeddings({"mm_embeddings": []}) == []

    class Output:  # a RequestOutput without params
        ec_transfer_params = None
    assert load_mm_embeddings(Output()) == []


def test_prompt_order_and_waits_for_a_late_upload(tmp_path):
    store = LocalDirStore(tmp_path, fsync=False)
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    put(store, "aa", a)
    threading.Timer(0.3, put, (store, "bb", b)).start()
    params = params_for(store, ["bb", "aa"])
    params["mm_embeddings"].reverse()  # item_index decides the order, not list order
    t0 = time.monotonic()
    got = load_mm_embeddings(params, timeout=10, local_dirs=[tmp_path])
    assert time.monotonic() - t0 >= 0.25
    assert torch.equal(got[0], b) and torch.equal(got[1], a)


def test_times_out_with_the_uri(tmp_path):
    store = LocalDirStore(tmp_path, fsync=False)
    with pytest.raises(EmbeddingNotAvailable, match="never.safetensors is not in the object store after 0.3s"):
        load_mm_embeddings(params_for(store, ["never"]), timeout=0.3, local_dirs=[tmp_path])


def test_refused_request_raises_its_reason():
    with pytest.raises(ValueError, match="client-supplied"):
        load_mm_embeddings({"mm_embeddings": [], "error": "image item 0 arrived as client-supplied embeddings"})


def test_reads_only_under_the_callers_directories(tmp_path):
    """A response body cannot make the caller read its files: file:// only under local_dirs."""
    store = LocalDirStore(tmp_path / "objects", fsync=False)
    put(store, "aa", torch.randn(2, 4))
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes((tmp_path / "objects" / "m" / "aa.safetensors").read_bytes())
    (tmp_path / "objects" / "m" / "link.safetensors").symlink_to(secret)
    allowed = [tmp_path / "objects"]
    assert len(load_mm_embeddings(params_for(store, ["aa"]), local_dirs=allowed)) == 1
    for uri in (secret.as_uri(), store.uri("m/../../secret.safetensors"), store.uri("m/link.safetensors")):
        params = {"mm_embeddings": [{"uri": uri, "mm_hash": "aa", "modality": "image", "item_index": 0}]}
        with pytest.raises(ForbiddenObject, match="outside the configured object store"):
            load_mm_embeddings(params, local_dirs=allowed)
    with pytest.raises(ForbiddenObject):  # by default only the publisher's own default directory
        load_mm_embeddings(params_for(store, ["aa"]))


def test_the_params_do_not_choose_the_s3_endpoint():
    params = {"mm_embeddings": [{"uri": "s3://b/k.safetensors", "mm_hash": "h", "modality": "image",
                                 "item_index": 0}], "s3_endpoint_url": "http://attacker.example:9000"}
    with pytest.raises(ValueError, match="not one you allowed"):
        load_mm_embeddings(params, endpoint_url="http://minio.internal:9000")


def test_reads_are_capped(tmp_path):
    store = LocalDirStore(tmp_path, fsync=False)
    put(store, "aa", torch.randn(64, 64))
    with pytest.raises(ObjectTooLarge):
        load_mm_embeddings(params_for(store, ["aa"]), local_dirs=[tmp_path], max_object_bytes=1000)


def test_an_object_named_many_times_is_read_once_and_the_total_is_capped(tmp_path, monkeypatch):
    """Each object was capped, not the response: 40 names of one 16 MiB object held 640 MiB (a response
    naming it 1,000 times asked for 16 GiB). An image given twice is one object read once, counted twice."""
    from publisher.stores.reader import ObjectReader

    store = LocalDirStore(tmp_path, fsync=False)
    t = torch.randn(64, 64)
    put(store, "aa", t)
    size = (tmp_path / "m" / "aa.safetensors").stat().st_size
    gets = []
    real_get = ObjectReader.get
    monkeypatch.setattr(ObjectReader, "get", lambda self, uri: gets.append(uri) or real_get(self, uri))
    got = load_mm_embeddings(params_for(store, ["aa", "aa", "aa"]), local_dirs=[tmp_path],
                             max_total_bytes=3 * size)
    assert len(got) == 3 and all(torch.equal(x, t) for x in got) and len(gets) == 1
    with pytest.raises(ValueError, match="more than max_total_bytes"):
        load_mm_embeddings(params_for(store, ["aa"] * 4), local_dirs=[tmp_path], max_total_bytes=3 * size)


@pytest.mark.parametrize("refs", [
    [{"uri": "file:///x", "mm_hash": "h"}],  # no item_index: a KeyError before
    [{"uri": "file:///x", "mm_hash": "h", "item_index": "0"}],
    ["file:///x"],
    {"uri": "file:///x"},
    [{"uri": "file:///x", "mm_hash": "h", "item_index": i} for i in range(2000)],
])
def test_malformed_params_are_a_value_error_naming_the_field(refs):
    with pytest.raises(ValueError, match="mm_embeddings: expected a list"):
        load_mm_embeddings({"mm_embeddings": refs})
