"""reuse_stored_embeddings, below the engine: the fetch sidecar's checks on a real local store, the
scheduler's index (wait, promise, load, evict) and the worker's load into an encoder cache.
The engine end of it (two engines sharing MinIO) is tests/e2e/test_reuse.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from publisher.sidecar.encode import encode_embedding
from publisher.sidecar.fetcher import StoredEmbeddingFetcher, private_dir
from publisher.sidecar.messages import Fetch, Fetched, Reused
from publisher.stores.local import LocalDirStore
from publisher.vllm.capture import HostToDeviceLoad
from publisher.vllm.reuse import StoredItemIndex, load_stored

MODEL, DIGEST = "org/model", "blake3:" + "ab" * 32


def put(store, key, tensor, **kw):
    args = dict(mm_hash="h1", modality="image", model=MODEL, storage_dtype="bfloat16", input_digest=DIGEST)
    obj = encode_embedding(tensor, **{**args, **kw})
    store.put_if_absent(key, obj.data, obj.object_metadata())
    return obj


@pytest.fixture
def fetch(tmp_path):
    """fetch(msg) -> the fetcher's answer, on a real local store; the fetcher is ``fetch.fetcher``."""
    store = LocalDirStore(tmp_path / "objects", fsync=False)
    answers: list[Fetched] = []
    got = threading.Event()

    def reply(m):
        answers.append(m)
        got.set()
    fetcher = StoredEmbeddingFetcher(store, private_dir() / "ring", 4096, model=MODEL, model_dtype="bfloat16",
                                     storage_dtype="bfloat16", hidden_size=8, reply=reply)

    def run(msg: Fetch) -> Fetched:
        got.clear()
        fetcher.submit(msg)
        assert got.wait(10)
        return answers[-1]
    run.store, run.fetcher = store, fetcher
    yield run
    fetcher.close()
    assert not fetcher.ring_path.parent.exists()  # the ring goes with it


def test_a_checked_object_is_fetched_into_the_staging_ring_on_tmpfs(fetch):
    t = torch.randn(4, 8).to(torch.bfloat16)
    put(fetch.store, "k/h1", t)
    a = fetch(Fetch("k/h1", "h1", DIGEST, 4, offset=256))
    assert a.outcome == "hit" and a.reason == ""
    ring = fetch.fetcher.ring_path
    assert str(ring).startswith("/dev/shm/") and oct(ring.parent.stat().st_mode & 0o777) == "0o700"
    raw = ring.read_bytes()
    assert raw[256:256 + 64] == t.view(torch.uint16).numpy().tobytes()  # the raw tensor, where asked
    assert raw[:256] == bytes(256) and raw[320:] == bytes(4096 - 320)
    assert fetch.fetcher.stats.as_dict() == {"reused": 0, "fetched": 1, "absent": 0, "rejected": 0,
                                             "fetch_errors": 0, "bytes_fetched": 64}
    # A region past the ring's end is refused, never written.
    assert fetch(Fetch("k/h1", "h1", DIGEST, 4, offset=4096 - 32)).outcome == "rejected"


def test_absent_is_a_plain_miss_and_so_is_an_object_stored_without_a_digest(fetch):
    assert fetch(Fetch("k/none", "h1", DIGEST, 4, 0)).outcome == "absent"
    # Stored by an older release or a replica with reuse off: never used, but nothing to alert on either.
    put(fetch.store, "k/h1", torch.randn(4, 8).to(torch.bfloat16), input_digest=None)
    assert fetch(Fetch("k/h1", "h1", DIGEST, 4, 0)) == Fetched("h1", "absent", reason="no input digest")
    assert fetch.fetcher.stats.absent == 2 and fetch.fetcher.stats.rejected == 0


@pytest.mark.parametrize("case, reason", [
    ("corrupted", "SHA-256"),
    ("other model", "model is"),
    ("other input", "input digest differs"),
    ("client embeddings", "source is"),
    ("other item", "mm_hash is"),
    ("lossy dtype", "not exactly"),
    ("float32 key", "names bfloat16"),
    ("other encoder dtype", "not exactly"),
    ("wrong shape", "shape [3, 8]"),
])
def test_an_object_that_cannot_stand_in_for_the_encoder_is_refused_with_the_reason(fetch, case, reason):
    t = torch.randn(4, 8).to(torch.bfloat16)
    kw = {"other model": dict(model="org/other"), "other input": dict(input_digest="blake3:" + "cd" * 32),
          "client embeddings": dict(source="CLIENT"),
          "other item": dict(mm_hash="h2"), "lossy dtype": dict(storage_dtype="float16"),
          "float32 key": dict(storage_dtype="float32")}.get(case, {})
    if case == "other encoder dtype":  # float16 values widened to float32: exact, but not what a bf16 encoder gives
        t, kw = torch.randn(4, 8).to(torch.float16), dict(storage_dtype="float32")
    obj = put(fetch.store, "k/h1", t[:3] if case == "wrong shape" else t, **kw)
    if case == "corrupted":  # same size and recorded checksum, one byte changed in place
        data = bytearray(obj.data)
        data[-1] ^= 0xFF
        _overwrite(fetch.store, "k/h1", bytes(data))
    a = fetch(Fetch("k/h1", "h1", DIGEST, 4, 0))
    assert a.outcome == "rejected" and reason in a.reason, a
    assert fetch.fetcher.stats.rejected == 1 and fetch.fetcher.stats.fetched == 0
    assert fetch.fetcher.ring_path.read_bytes() == bytes(4096)  # nothing written


def _overwrite(store: LocalDirStore, key: str, data: bytes) -> None:
    """What someone with write access to the store's files could do (put-if-absent never would)."""
    target = Path(store.uri(key).removeprefix("file://"))
    target.chmod(0o644)
    target.write_bytes(data)


# ---- the scheduler's index ----------------------------------------------------------------------

def feature(h: str, offset: int = 0, length: int = 4):
    pos = SimpleNamespace(offset=offset, length=length, get_num_embeds=lambda: length)
    data = {"pixel_values": SimpleNamespace(data=torch.full((2, 3), float(ord(h[0]))))}
    return SimpleNamespace(identifier=h, mm_position=pos, data=data)


class Wire:
    """Both ends of the index's messages: what it sent, and answers to give it."""

    def __init__(self):
        self.sent, self.answers = [], []

    def send(self, msg) -> bool:
        self.sent.append(msg)
        return True

    def receive(self) -> list:
        out, self.answers = self.answers, []
        return out


def request(rid: str, *features):
    return SimpleNamespace(request_id=rid, mm_features=list(features))


def test_a_new_request_waits_for_its_fetches_then_the_promise_holds_until_the_load(tmp_path):
    wire = Wire()
    index = StoredItemIndex(wire.send, wire.receive, wait_s=5.0, ring_size=1 << 20, hidden_size=8,
                            storage_dtype="bfloat16")
    a, b = feature("a"), feature("b", offset=4)
    r = request("r1", a, b)
    keys = {"a": "k/a", "b": "k/b"}.get
    assert not index.ready(r, 0, keys, lambda req: req.mm_features)  # both being fetched: wait
    assert [(m.key, m.num_embeds, m.offset) for m in wire.sent] == [("k/a", 4, 0), ("k/b", 4, 256)]
    assert wire.sent[0].input_digest.startswith("blake3:") and wire.sent[0].input_digest != wire.sent[1].input_digest
    assert not index.ready(r, 0, keys, lambda req: req.mm_features) and len(wire.sent) == 2  # asked once each
    wire.answers = [Fetched("a", "hit"), Fetched("b", "absent")]
    assert index.ready(r, 0, keys, lambda req: req.mm_features)  # settled: a resident, b to encode
    assert index.has("a") and not index.has("b")
    # vLLM allocated both; it encodes b (index 1), so a is ours to load.
    out = SimpleNamespace(scheduled_encoder_inputs={"r1": [1]}, free_encoder_mm_hashes=[])
    loads, by_request = index.take_loads([("r1", 0, "a"), ("r1", 1, "b")], out)
    assert loads == {"a": (0, "bfloat16", (4, 8))} and by_request == {"r1": {"a"}}
    assert index.ring.used == 256  # b's region went back when it was found absent
    assert isinstance(wire.sent[-1], Reused) and wire.sent[-1].count == 1
    # Both now sit in vLLM's own encoder cache: a later request carrying them is not held back.
    assert index.ready(request("r2", a, b), 0, keys, lambda req: req.mm_features)


def test_the_wait_is_bounded_and_misses_are_not_asked_again_at_once():
    wire = Wire()
    index = StoredItemIndex(wire.send, wire.receive, wait_s=0.05, ring_size=1 << 20, hidden_size=8,
                            storage_dtype="bfloat16")
    r = request("r1", feature("a"))
    assert not index.ready(r, 0, str, lambda req: req.mm_features)
    time.sleep(0.06)
    assert index.ready(r, 0, str, lambda req: req.mm_features)  # still no answer: encode it
    wire.answers = [Fetched("a", "absent")]
    assert index.ready(request("r2", feature("a")), 0, str, lambda req: req.mm_features)  # known absent
    assert len(wire.sent) == 1
    # Items already computed (a prefix-cache hit past them) are not looked up at all.
    assert index.ready(request("r3", feature("c", 0, 4)), 4, str, lambda req: req.mm_features)
    assert len(wire.sent) == 1


def test_the_ring_evicts_oldest_first_but_never_an_item_promised_to_vllm():
    wire = Wire()
    # Room for two 4-row items (256 bytes each after alignment) and not three.
    index = StoredItemIndex(wire.send, wire.receive, wait_s=60, ring_size=600, hidden_size=8, storage_dtype="bfloat16")
    keys = str

    def fetched(h):
        assert not index.ready(request("r-" + h, feature(h)), 0, keys, lambda req: req.mm_features)
        wire.answers.append(Fetched(h, "hit"))
        index.poll()

    fetched("a")
    fetched("b")
    assert set(index.resident) == {"a", "b"} and index.has("a")  # a is now promised: kept however full
    fetched("c")  # needs room: b goes (a is promised)
    assert set(index.resident) == {"a", "c"}
    # A fourth finds only promised or in-flight space: it is not fetched (the encoder runs it).
    index.has("c")
    before = len(wire.sent)
    assert index.ready(request("r-d", feature("d")), 0, keys, lambda req: req.mm_features)
    assert len(wire.sent) == before and "d" not in index.fetching


# ---- the worker's load --------------------------------------------------------------------------

def test_load_copies_the_stored_values_out_of_the_ring_in_the_models_dtype(tmp_path):
    t = torch.randn(5, 8).to(torch.bfloat16)
    ring = tmp_path / "ring"
    ring.write_bytes(t.view(torch.uint16).numpy().tobytes() + bytes(176) + t.float().numpy().tobytes())
    loader = HostToDeviceLoad()
    loader.attach(str(ring), ring.stat().st_size, torch.device("cpu"))
    cache = {"old": torch.zeros(1)}
    loads = {"x": (0, "bfloat16", (5, 8)), "y": (256, "float32", (5, 8)),
             "old": (0, "bfloat16", (5, 8))}  # already cached: left alone
    n = load_stored(cache, loads, torch.device("cpu"), torch.bfloat16, loader)
    assert n == 2 and torch.equal(cache["x"], t) and torch.equal(cache["y"], t) and cache["y"].dtype == torch.bfloat16
    assert np.array_equal(cache["old"].numpy(), [0.0])
    ring.write_bytes(bytes(ring.stat().st_size))  # the region is reused later: the cache kept its own copy
    assert torch.equal(cache["x"], t)


def test_span_allocator_reuses_space_freed_in_any_order():
    from publisher.sidecar.ring import SpanAllocator

    a = SpanAllocator(1024)
    x, y, z, w = (a.alloc(200) for _ in range(4))
    assert (x, y, z, w) == (0, 256, 512, 768) and a.alloc(1) is None
    a.free(y)  # a hole between two live regions
    assert a.alloc(300) is None and a.alloc(256) == 256
    a.free(256)
    a.free(z)  # merges with the hole before it
    assert a.alloc(512) == 256 and a.used == 1024
    for offset in (x, 256, w):
        a.free(offset)
    assert a.used == 0 and a.alloc(1024) == 0  # everything merged back into one span


def test_a_failed_lookup_pauses_lookups_so_requests_stop_waiting_on_a_store_that_is_away():
    wire = Wire()
    index = StoredItemIndex(wire.send, wire.receive, wait_s=60, ring_size=1 << 20, hidden_size=8,
                            storage_dtype="bfloat16")
    assert not index.ready(request("r1", feature("a")), 0, str, lambda req: req.mm_features)
    wire.answers = [Fetched("a", "error", reason="ConnectionRefusedError")]
    assert index.ready(request("r1", feature("a")), 0, str, lambda req: req.mm_features)
    assert index.ready(request("r2", feature("b")), 0, str, lambda req: req.mm_features)  # no wait, no lookup
    assert [m.mm_hash for m in wire.sent] == ["a"] and index.ring.used == 0


def test_an_item_resident_for_another_input_under_the_same_id_is_never_promised_to_this_request():
    """A client-chosen id may name other pixels in another request: what is resident was checked against
    the first request's input, so a second request with other input under that id gets its own lookup."""
    wire = Wire()
    index = StoredItemIndex(wire.send, wire.receive, wait_s=60, ring_size=1 << 20, hidden_size=8,
                            storage_dtype="bfloat16")
    mine = feature("x")
    assert not index.ready(request("r1", mine), 0, str, lambda req: req.mm_features)
    wire.answers = [Fetched("x", "hit")]
    assert index.ready(request("r1", mine), 0, str, lambda req: req.mm_features) and "x" in index.resident
    other = feature("x")
    other.data = {"pixel_values": SimpleNamespace(data=torch.zeros(2, 3))}  # same id, other pixels
    assert not index.ready(request("r2", other), 0, str, lambda req: req.mm_features)  # looked up for its own input
    assert "x" not in index.resident and wire.sent[-1].input_digest != wire.sent[0].input_digest
    # While a promise to that input stands, a request with other input under the id is not promised it
    # (its own lookup follows), and the promised region is left alone until the promise has run out.
    wire.answers = [Fetched("x", "hit")]
    index.poll()
    assert index.has("x")
    promised = index.resident["x"].offset
    assert not index.ready(request("r3", feature("x")), 0, str, lambda req: req.mm_features)
    assert not index.has("x") and wire.sent[-1].offset != promised and index._draining[0][1] == promised
    # Scalar (0-d) inputs, as vLLM gives batched per-item fields (Qwen2.5-VL's second_per_grid_ts), digest fine.
    scalar = feature("s")
    scalar.data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(0.5))
    assert index.digest("r4", scalar).startswith("blake3:")


def test_staging_dirs_of_processes_killed_outright_are_removed_at_the_next_start():
    """A pod's /dev/shm outlives its containers: a staging ring left by an engine and fetch sidecar killed
    outright (SIGKILL, nobody to remove it) is removed when the next engine makes its own; one of a
    process still running is kept. Before, each kill left reuse_cache_bytes of the pod's memory behind."""
    import signal
    import subprocess
    import sys

    make = ("import os, sys; from publisher.sidecar.fetcher import private_dir; d = private_dir(); "
            "fd = os.open(d / 'ring', os.O_RDWR | os.O_CREAT, 0o600); os.posix_fallocate(fd, 0, 1 << 20); "
            "print(d, flush=True); {end}")
    repo = Path(__file__).resolve().parents[2]
    killed = subprocess.run([sys.executable, "-c", make.format(end="os.kill(os.getpid(), 9)")], cwd=repo,
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    left = Path(killed.stdout.strip())
    assert (left / "ring").stat().st_size == 1 << 20
    running = subprocess.Popen([sys.executable, "-c", make.format(end="sys.stdin.read()")], cwd=repo,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        kept = Path(running.stdout.readline().strip())
        assert not left.exists() and (kept / "ring").exists()  # the next start removed it
        mine = private_dir()
        assert (kept / "ring").exists() and mine.is_dir()  # its process runs
    finally:
        running.communicate("", timeout=60)
    mine.rmdir()
    private_dir().rmdir()  # and now the one of the process that ended without removing its own
    assert not kept.exists()
