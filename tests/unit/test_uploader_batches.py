"""The worker sidecar's uploader groups what the engine captures into batches for a group-committing
store (the local directory: one sync per batch), against a real LocalDirStore: items that arrive
within the linger go in one batch, a batch that reaches its byte cap goes at once, what arrives while
a batch is being stored goes in the next one, and every item is stored and released exactly once."""

from __future__ import annotations

import threading
import time

import torch

from publisher.sidecar.uploader import ObjectUploader, UploadJob
from publisher.stores.local import LocalDirStore
from schemas.objects import read_object


class BatchRecordingStore(LocalDirStore):
    """The real local store; remembers the keys of each batch it was given."""

    def __init__(self, root, linger_s: float):
        super().__init__(root)
        self.commit_linger_s = linger_s
        self.batches: list[list[str]] = []

    def put_many(self, items):
        self.batches.append([k for k, _, _ in items])
        return super().put_many(items)


def job(i: int, released: list[int], rows: int = 4) -> UploadJob:
    return UploadJob(f"m/float32/{i:064x}.safetensors", torch.full((rows, 8), float(i)), lambda: released.append(i),
                     f"{i:064x}", "image", "ENCODER")


def test_items_within_the_linger_are_one_batch_and_each_is_stored_once(tmp_path):
    store = BatchRecordingStore(tmp_path, linger_s=0.3)
    released: list[int] = []
    up = ObjectUploader(store, "m", "float32", threads=2)
    t0 = time.monotonic()
    for i in range(10):
        up.submit(job(i, released))
        time.sleep(0.01)
    assert up.drain(5) == 0
    assert len(store.batches) == 1 and len(store.batches[0]) == 10
    assert time.monotonic() - t0 >= 0.3  # it waited out the linger for company
    assert sorted(released) == list(range(10)) and up.stats.uploaded == 10
    for i in range(10):
        assert read_object(store.get(f"m/float32/{i:064x}.safetensors")).raw[0, 0] == float(i)
    up.close(5)


def test_a_batch_at_its_byte_cap_goes_without_waiting_out_the_linger(tmp_path):
    store = BatchRecordingStore(tmp_path, linger_s=10.0)
    released: list[int] = []
    up = ObjectUploader(store, "m", "float32", threads=1)
    up.max_batch_bytes = 3 * 4096 * 8 * 4  # three of these items
    t0 = time.monotonic()
    for i in range(3):
        up.submit(job(i, released, rows=4096))
    assert up.drain(5) == 0
    assert time.monotonic() - t0 < 5
    assert [len(b) for b in store.batches] == [3]
    up.close(5)


def test_what_arrives_while_a_batch_is_stored_goes_in_the_next(tmp_path):
    store = BatchRecordingStore(tmp_path, linger_s=0.05)
    gate, entered = threading.Event(), threading.Event()
    first_put = store.put_many

    def slow_first(items):  # the first batch's store takes until the gate opens
        if not entered.is_set():
            entered.set()
            gate.wait(5)
        return first_put(items)

    store.put_many = slow_first
    released: list[int] = []
    up = ObjectUploader(store, "m", "float32", threads=2)
    up.submit(job(0, released))
    assert entered.wait(5)
    for i in range(1, 6):
        up.submit(job(i, released))
    time.sleep(0.3)  # the other thread collects and stores these meanwhile (the first is still held)
    later = [f"m/float32/{i:064x}.safetensors" for i in range(1, 6)]
    assert store.batches == [later]
    gate.set()
    assert up.drain(5) == 0
    assert store.batches == [later, ["m/float32/" + f"{0:064x}.safetensors"]]
    assert sorted(released) == list(range(6)) and up.stats.uploaded == 6
    assert up.close(5) == 0
