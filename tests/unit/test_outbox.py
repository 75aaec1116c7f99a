"""The scheduler sidecar's durable outbox: replay after a crash, removal after acknowledgement,
torn writes, the size cap, one slot per running publisher, and the dispatcher around it."""

import os
import time

import fastavro
import pytest

from publisher.event_sinks.avro_file import AvroFileSink
from publisher.event_sinks.base import EventSink
from publisher.sidecar.dispatcher import EventDispatcher
from publisher.sidecar.events import FinishedRequest, MediaItem, producer_info
from publisher.sidecar.outbox import Outbox, OutboxFull
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec

STREAM = "kafka://broker:9092/events"


def req(rid, hashes=("a",)):
    return FinishedRequest(rid, rid + "-00000000", "m", "stop", None, 10, 2, {"k": "v\x00"}, tuple(
        MediaItem(h, "image", i, i * 16, 16) for i, h in enumerate(hashes)), None, None, time.time())


def test_unacknowledged_requests_are_replayed_in_order_with_their_event_ids(tmp_path):
    box = Outbox(tmp_path, STREAM, 1 << 30)
    reqs = [req(f"r{i}") for i in range(5)]
    for r in reqs:
        box.append(r, {"a": f"key/{r.request_id}"})
    box.sync()
    box.ack(reqs[1].event_id)
    box.ack(reqs[3].event_id)
    box.close()  # a crash after the sync: the process is gone, the files stay
    again = Outbox(tmp_path, STREAM, 1 << 30)
    replay = again.take_replay()
    assert [r for r, _ in replay] == [reqs[0], reqs[2], reqs[4]]  # equal dataclasses: same event ids, same data
    assert [k for _, k in replay] == [{"a": "key/r0"}, {"a": "key/r2"}, {"a": "key/r4"}]
    assert again.take_replay() == []


def test_acknowledged_segments_are_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr("publisher.sidecar.outbox.SEGMENT_BYTES", 600)  # a few records per segment
    box = Outbox(tmp_path, STREAM, 1 << 30)
    reqs = [req(f"r{i}") for i in range(12)]
    for r in reqs:
        box.append(r, {"a": "k"})
    box.sync()
    assert len(list(box.dir.glob("*.seg"))) >= 3
    for r in reqs:
        box.ack(r.event_id)
    assert len(list(box.dir.glob("*.seg"))) == 1  # the one still being written
    box.close()
    assert Outbox(tmp_path, STREAM, 1 << 30).take_replay() == []


def test_a_torn_last_record_is_dropped_and_the_rest_replayed(tmp_path):
    box = Outbox(tmp_path, STREAM, 1 << 30)
    for i in range(3):
        box.append(req(f"r{i}"), {"a": "k"})
    box.sync()
    box.close()
    (seg,) = box.dir.glob("*.seg")
    with open(seg, "r+b") as f:  # the crash cut the last record short
        f.truncate(os.path.getsize(seg) - 5)
    assert [r.request_id for r, _ in Outbox(tmp_path, STREAM, 1 << 30).take_replay()] == ["r0", "r1"]


def test_the_size_cap_refuses_more(tmp_path):
    box = Outbox(tmp_path, STREAM, 1 << 20)
    big = req("big", hashes=tuple(f"h{i:06d}" for i in range(9000)))
    with pytest.raises(OutboxFull):
        for _ in range(20):
            box.append(big, {})
    assert box.full()


def test_one_slot_per_running_publisher_and_one_spool_per_stream(tmp_path):
    a, b = Outbox(tmp_path, STREAM, 1 << 30), Outbox(tmp_path, STREAM, 1 << 30)
    other = Outbox(tmp_path, "file:///elsewhere/events.avro", 1 << 30)
    assert a.dir != b.dir and a.dir.parent == b.dir.parent != other.dir.parent
    a.append(req("r"), {})
    a.sync()
    a.close()
    assert Outbox(tmp_path, "file:///elsewhere/events.avro", 1 << 30).take_replay() == []  # not its stream
    assert [r.request_id for r, _ in Outbox(tmp_path, STREAM, 1 << 30).take_replay()] == ["r"]  # a's free slot


class DownSink(EventSink):
    """A sink whose broker is away: nothing is ever acknowledged."""

    def publish(self, event, on_done):
        pass

    def flush(self, timeout):
        return 0


def test_dispatcher_replays_what_a_dead_sidecar_left_and_delivers_each_once(tmp_path):
    store = LocalDirStore(tmp_path / "o", fsync=False)
    store.put_if_absent("k/a", b"x", {"sha256": "0" * 64, "dtype": "float32", "shape": "[1, 1]"})
    first = EventDispatcher(store, DownSink(), producer_info("v", "float32"), durability_timeout_s=5,
                            outbox=Outbox(tmp_path / "spool", STREAM, 1 << 30))
    reqs = [req(f"r{i}") for i in range(4)]
    for r in reqs:
        first.offer(r, {"a": "k/a"})
    first.pump()  # spooled (fsync) before anything is sent
    first.outbox.close()  # the sidecar dies with its events unacknowledged

    log = tmp_path / "e.avro"
    box = Outbox(tmp_path / "spool", STREAM, 1 << 30)
    second = EventDispatcher(store, AvroFileSink(log, AvroCodec()), producer_info("v", "float32"),
                             durability_timeout_s=5, outbox=box)
    for r, keys in box.take_replay():
        second.offer(r, keys, replayed=True)
    end = time.monotonic() + 10
    while second.stats.published < 4 and time.monotonic() < end:
        time.sleep(second.pump())
    assert second.stats.replayed == 4 and second.stats.published == 4
    with open(log, "rb") as f:
        events = list(fastavro.reader(f))
    assert [e["event_id"] for e in events] == [r.event_id for r in reqs]  # the same ids, once each
    assert second.close(1) == 0
    assert Outbox(tmp_path / "spool", STREAM, 1 << 30).take_replay() == []  # all acknowledged


def test_a_spooled_request_reads_back_equal(tmp_path):
    """Every field of a finished request survives the spool's encoding, items and metadata included."""
    from publisher.sidecar.outbox import _decode, _encode

    req = FinishedRequest("r-1", "r-1-abc", "m", "stop", None, 12, 3, {"tenant": "acme", "n": "[1, 2]"},
                          (MediaItem("h1", "image", 0, 5, 576), MediaItem("h2", "video", 1, 600, 1296, "CLIENT")),
                          "lora-a", 1.5, 2.5, "00-abc-def-01")
    keys = {"h1": "k/h1.safetensors", "h2": "k/h2.safetensors"}
    assert _decode(_encode(req, keys)) == (req, keys)


def test_a_record_has_only_the_fields_an_older_publisher_reads(tmp_path):
    """A publisher downgraded onto this spool must be able to replay it (its reader builds
    ``FinishedRequest(**record)``): a record holds the request's fields and nothing else (the stop-string
    check travels beside the request, is used before spooling, and is never stored)."""
    import dataclasses
    import json

    from publisher.sidecar.outbox import _encode

    r = req("r0")
    record = json.loads(_encode(r, {"a": "k"}))["req"]
    assert set(record) == {f.name for f in dataclasses.fields(FinishedRequest)}
    box = Outbox(tmp_path, STREAM, 1 << 30)
    box.append(r, {"a": "k"})
    box.close()
    assert [x for x, _ in Outbox(tmp_path, STREAM, 1 << 30).take_replay()] == [r]


def test_the_acks_file_stays_bounded_while_some_event_is_always_in_flight(tmp_path, monkeypatch):
    """A steady load: each request is acknowledged after the next one is spooled, so the outbox is never
    empty. Acknowledged segments go, and the acks file is compacted to their live lines; before, it only
    shrank once everything was acknowledged, which never came, and grew by every event for good."""
    monkeypatch.setattr("publisher.sidecar.outbox.SEGMENT_BYTES", 64 << 10)
    monkeypatch.setattr("publisher.sidecar.outbox.ACKS_COMPACT_BYTES", 64 << 10)
    box = Outbox(tmp_path, STREAM, 1 << 30, fsync=False)
    previous, largest = None, 0
    for i in range(20_000):  # ~740 KB of ack lines in all
        r = req(f"r{i}")
        box.append(r, {"a": "k"})
        if previous is not None:
            box.ack(previous.event_id)
        box.sync()
        largest = max(largest, (box.dir / "acks").stat().st_size)
        previous = r
    assert largest <= 2 * (64 << 10) + 64 * 37, largest  # the threshold, plus one segment's live lines
    assert len(list(box.dir.glob("*.seg"))) <= 2 and box.bytes <= 2 * (64 << 10)
    box.close()  # then a restart: exactly the one in flight comes back
    again = Outbox(tmp_path, STREAM, 1 << 30)
    assert [r.request_id for r, _ in again.take_replay()] == ["r19999"]


def test_a_segment_acknowledged_while_it_was_written_goes_at_rotation(tmp_path, monkeypatch):
    monkeypatch.setattr("publisher.sidecar.outbox.SEGMENT_BYTES", 600)
    box = Outbox(tmp_path, STREAM, 1 << 30, fsync=False)
    for i in range(40):  # one request at a time, acknowledged before the next: nothing in flight between
        r = req(f"r{i}")
        box.append(r, {"a": "k"})
        box.sync()
        box.ack(r.event_id)
    assert len(list(box.dir.glob("*.seg"))) == 1 and box.bytes < 600 + 600
