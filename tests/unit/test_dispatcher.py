"""The scheduler sidecar's dispatcher against a real local store and a real Avro log."""

import os
import threading
import time

import fastavro
import numpy as np
import torch

from publisher.event_sinks.avro_file import AvroFileSink
from publisher.sidecar.dispatcher import EventDispatcher
from publisher.sidecar.encode import encode_embedding
from publisher.sidecar.events import FinishedRequest, MediaItem, producer_info
from publisher.sidecar.outbox import Outbox
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec


def req(rid, hashes):
    return FinishedRequest(rid, rid + "-00000000", "m", "stop", None, 10, 2, {}, tuple(
        MediaItem(h, "image", i, i * 16, 16) for i, h in enumerate(hashes)), None, None, time.time())


def put(store, h, extras=None):
    o = encode_embedding(torch.randn(4, 8), mm_hash=h, modality="image", model="m", storage_dtype="float32",
                         extras=extras)
    store.put_if_absent(f"k/{h}", o.data, o.object_metadata())
    return o


def run_until(d, cond, timeout=10):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(d.pump())


def test_event_waits_for_a_late_object_then_names_it(tmp_path):
    store = LocalDirStore(tmp_path / "o", fsync=False)
    sink = AvroFileSink(tmp_path / "e.avro", AvroCodec())
    d = EventDispatcher(store, sink, producer_info("v", "float32"), durability_timeout_s=10)
    d.offer(req("r1", ["a"]), {"a": "k/a"})
    run_until(d, lambda: False, timeout=0.2)
    assert d.stats.published == 0  # not yet: the object is not there
    threading.Timer(0.1, put, (store, "a")).start()
    run_until(d, lambda: d.stats.published == 1)
    (e,) = list(fastavro.reader(open(tmp_path / "e.avro", "rb")))
    assert e["missing_embeddings"] == [] and e["embeddings"][0]["uri"] == store.uri("k/a")
    assert e["timings"]["publish_latency_ms"] >= 100


def test_missing_object_is_listed_never_named(tmp_path):
    store = LocalDirStore(tmp_path / "o", fsync=False)
    o = put(store, "b")
    sink = AvroFileSink(tmp_path / "e.avro", AvroCodec())
    d = EventDispatcher(store, sink, producer_info("v", "float32"), durability_timeout_s=0.3)
    d.offer(req("r2", ["b", "gone"]), {"b": "k/b", "gone": "k/gone"})
    run_until(d, lambda: d.stats.published == 1)
    (e,) = list(fastavro.reader(open(tmp_path / "e.avro", "rb")))
    assert [x["mm_hash"] for x in e["embeddings"]] == ["b"] and e["missing_embeddings"] == ["gone"]
    assert e["embeddings"][0]["sha256"] == o.sha256 and d.stats.incomplete == 1


def test_event_lists_the_extra_tensors_its_object_holds(tmp_path):
    store = LocalDirStore(tmp_path / "o", fsync=False)
    put(store, "q", {"image_grid_thw": np.array([[1, 2, 2]]), "second_per_grid_ts": np.array([1.0], np.float32)})
    put(store, "l")
    sink = AvroFileSink(tmp_path / "e.avro", AvroCodec())
    d = EventDispatcher(store, sink, producer_info("v", "float32"), durability_timeout_s=5)
    d.offer(req("r3", ["q", "l"]), {"q": "k/q", "l": "k/l"})
    run_until(d, lambda: d.stats.published == 1)
    (e,) = list(fastavro.reader(open(tmp_path / "e.avro", "rb")))
    assert [x["extra_tensors"] for x in e["embeddings"]] == [["image_grid_thw", "second_per_grid_ts"], []]


def test_close_is_bounded_and_reports(tmp_path):
    store = LocalDirStore(tmp_path / "o", fsync=False)
    sink = AvroFileSink(tmp_path / "e.avro", AvroCodec())
    d = EventDispatcher(store, sink, producer_info("v", "float32"), durability_timeout_s=60)
    d.offer(req("r3", ["never"]), {"never": "k/never"})
    t0 = time.monotonic()
    assert d.close(0.5) == 0  # published without the object once the close deadline came
    assert time.monotonic() - t0 < 2
    (e,) = list(fastavro.reader(open(tmp_path / "e.avro", "rb")))
    assert e["missing_embeddings"] == ["never"]


def test_an_object_with_metadata_of_another_writer_is_listed_missing_never_a_crash(tmp_path, caplog):
    """Objects at publisher keys whose metadata the publisher did not write (a bucket writer's, or a gateway
    that dropped it) are not durable: the request waits for its deadline and lists them missing. Each is
    checked and reported once; the dispatcher's loop goes on (it used to raise out of pump, on every start)."""
    store = LocalDirStore(tmp_path / "o", fsync=False)
    good = put(store, "good")
    planted = {
        "nometa": {},  # no sha256, dtype, shape
        "badshape": {"sha256": good.sha256, "dtype": "float32", "shape": "[4, 8"},  # not JSON
        "notints": {"sha256": good.sha256, "dtype": "float32", "shape": '"48"'},  # JSON, would not encode
        "notstr": {"sha256": 5, "dtype": "float32", "shape": "[4, 8]"},
        "deep": {"sha256": good.sha256, "dtype": "float32", "shape": "[" * 3000},  # past JSON's recursion limit
    }
    for h, meta in planted.items():
        assert store.put_if_absent(f"k/{h}", b"not an embedding", meta)
    sink = AvroFileSink(tmp_path / "e.avro", AvroCodec())
    outbox = Outbox(tmp_path / "spool", "file:///e.avro", 1 << 20)
    d = EventDispatcher(store, sink, producer_info("v", "float32"), durability_timeout_s=0.5, outbox=outbox)
    hashes = ["good", *planted]
    d.offer(req("r1", hashes), {h: f"k/{h}" for h in hashes})
    d.offer(req("r2", ["nometa"]), {"nometa": "k/nometa"})
    t0 = time.monotonic()
    run_until(d, lambda: d.stats.published == 2)
    assert time.monotonic() - t0 >= 0.5  # waited for the deadline
    events = list(fastavro.reader(open(tmp_path / "e.avro", "rb")))
    assert [e["request_id"] for e in events] == ["r1", "r2"]
    assert [x["mm_hash"] for x in events[0]["embeddings"]] == ["good"]
    assert events[0]["missing_embeddings"] == list(planted) and events[1]["missing_embeddings"] == ["nometa"]
    assert {k: v for k, v in d.stats.as_dict().items() if v} == {
        "accepted": 2, "published": 2, "incomplete": 2, "store_errors": 5}
    assert [h for h in planted if f"object at k/{h} is not the publisher's" in caplog.text] == list(planted)
    assert d.close(1) == 0
    assert Outbox(tmp_path / "spool", "file:///e.avro", 1 << 20).take_replay() == []


class StoreAway(LocalDirStore):
    """A real local store whose checks fail while ``away`` (an object store outage, for the dispatcher)."""

    away = False

    def head_many(self, keys):
        if self.away:
            raise OSError("the store is away")
        return super().head_many(keys)


def age(d: EventDispatcher, seconds: float) -> None:
    """Make every verdict of the dispatcher ``seconds`` older (instead of waiting recheck_s out)."""
    for key, (item, seen) in list(d._durable.items()):
        d._durable[key] = (item, seen - seconds)
    for key, seen in list(d._foreign.items()):
        d._foreign[key] = seen - seconds


def test_a_key_seen_durable_is_checked_again_after_recheck_s(tmp_path):
    """An object a lifecycle rule (or an operator) deleted after the dispatcher saw it durable is named no
    longer once ``recheck_s`` passed: the next event lists it missing. One not the publisher's at first
    (a foreign writer's) is named once the publisher's object is there again. Before, both verdicts were
    kept for the sidecar's lifetime: events named a deleted object for good, and a repaired one never.
    A verdict due for its check stands while the store is away (an outage is no news of a deletion)."""
    store = StoreAway(tmp_path / "o", fsync=False)
    put(store, "a")
    assert store.put_if_absent("k/f", b"not an embedding", {})
    sink = AvroFileSink(tmp_path / "e.avro", AvroCodec())
    d = EventDispatcher(store, sink, producer_info("v", "float32"), durability_timeout_s=0.3, recheck_s=600)
    keys = {"a": "k/a", "f": "k/f"}
    d.offer(req("r1", ["a", "f"]), keys)
    run_until(d, lambda: d.stats.published == 1)
    for key in ("k/a", "k/f"):  # the lifecycle rule; and the foreign object put right
        os.unlink(store._path(key))
    put(store, "f")
    d.offer(req("r2", ["a", "f"]), keys)  # within recheck_s: the verdicts stand
    run_until(d, lambda: d.stats.published == 2)
    age(d, 600)
    store.away = True
    d.offer(req("r3", ["a", "f"]), keys)  # due for their checks, which fail: the verdicts still stand
    run_until(d, lambda: d.stats.published == 3)
    store.away = False
    d.offer(req("r4", ["a", "f"]), keys)  # checked
    run_until(d, lambda: d.stats.published == 4)
    events = list(fastavro.reader(open(tmp_path / "e.avro", "rb")))
    named = [[x["mm_hash"] for x in e["embeddings"]] for e in events]
    assert named == [["a"], ["a"], ["a"], ["f"]], named
    assert [e["missing_embeddings"] for e in events] == [["f"], ["f"], ["f"], ["a"]]


def test_items_a_request_never_reached_are_checked_once_not_waited_for(tmp_path, caplog):
    """A request aborted (or failed) before its placeholder was scheduled ran no encoder for that item: its
    event waited the whole durability_timeout_s for an object nothing was storing, in flight all along (a
    stream of such aborts filled max_pending_events and blocked the engine), and was counted incomplete."""
    from dataclasses import replace

    store = LocalDirStore(tmp_path / "o", fsync=False)
    put(store, "elsewhere")  # stored by another request with the same media
    sink = AvroFileSink(tmp_path / "e.avro", AvroCodec())
    d = EventDispatcher(store, sink, producer_info("v", "float32"), durability_timeout_s=5)

    def aborted(rid, hashes, unreached):
        r = req(rid, hashes)
        return replace(r, finish_reason="abort", items=tuple(replace(i, unreached=i.mm_hash in unreached)
                                                             for i in r.items))

    t0 = time.monotonic()
    d.offer(aborted("a", ["late", "never", "elsewhere"], {"never", "elsewhere"}), {h: f"k/{h}" for h in
                                                                                   ("late", "never", "elsewhere")})
    d.offer(aborted("b", ["never2"], {"never2"}), {"never2": "k/never2"})
    run_until(d, lambda: d.stats.published == 1, timeout=2)
    assert d.stats.published == 1 and time.monotonic() - t0 < 1  # b: one check, then published
    threading.Timer(0.3, put, (store, "late")).start()  # a's reached item: still being uploaded
    run_until(d, lambda: d.stats.published == 2, timeout=3)
    assert d.stats.published == 2 and time.monotonic() - t0 < 2  # a: once "late" is durable, not at 5 s
    events = {e["request_id"]: e for e in fastavro.reader(open(tmp_path / "e.avro", "rb"))}
    assert [x["mm_hash"] for x in events["a"]["embeddings"]] == ["late", "elsewhere"]
    assert events["a"]["missing_embeddings"] == ["never"] and events["b"]["missing_embeddings"] == ["never2"]
    assert d.stats.incomplete == 0 and "not durable in time" not in caplog.text  # nothing an outage left out
    d.offer(aborted("c", ["gone"], set()), {"gone": "k/gone"})  # reached, never stored: waited for, as before
    run_until(d, lambda: d.stats.published == 3, timeout=1)
    assert d.stats.published == 2
    assert d.close(1.5) == 0 and d.stats.incomplete == 1
