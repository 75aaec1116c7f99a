import threading
import time

import pytest
import torch

from publisher import EmbeddingNotAvailable, load_mm_embeddings
from publisher.sidecar.encode import encode_embedding
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
    got = load_mm_embeddings(params, timeout=10)
    assert time.monotonic() - t0 >= 0.25
    assert torch.equal(got[0], b) and torch.equal(got[1], a)


def test_times_out_with_the_uri(tmp_path):
    store = LocalDirStore(tmp_path, fsync=False)
    with pytest.raises(EmbeddingNotAvailable, match="never.safetensors is not in the object store after 0.3s"):
        load_mm_embeddings(params_for(store, ["never"]), timeout=0.3)


def test_refused_request_raises_its_reason():
    with pytest.raises(ValueError, match="client-supplied"):
        load_mm_embeddings({"mm_embeddings": [], "error": "image item 0 arrived as client-supplied embeddings"})
