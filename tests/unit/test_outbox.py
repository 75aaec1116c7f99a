"""The scheduler sidecar's durable outbox: replay after a crash, removal after acknowledgement,
torn writes, the size cap, one slot per running publisher, and the dispatcher around it."""

import contextlib
import json
import logging
import os
import shutil
import struct
import subprocess
import time
import zlib

import fastavro
import pytest

from publisher.event_sinks.avro_file import AvroFileSink
from publisher.event_sinks.base import EventSink
from publisher.sidecar.dispatcher import EventDispatcher
from publisher.sidecar.events import FinishedRequest, MediaItem, producer_info
from publisher.sidecar.outbox import Outbox, OutboxFull, SpoolError, _encode
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
    again = Outbox(tmp_path, STREAM, 1 << 30)
    assert [r.request_id for r, _ in again.take_replay()] == ["r0", "r1"]
    again.append(req("r3"), {})
    again.close()  # crashed again: the torn segment is no longer the last, and its tail is still only torn
    assert [r.request_id for r, _ in Outbox(tmp_path, STREAM, 1 << 30).take_replay()] == ["r0", "r1", "r3"]
    assert not list(box.dir.glob("*.corrupt"))


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


@contextlib.contextmanager
def read_only(path):
    """``path`` and its files immutable (``chattr +i``): every create, write, truncate and unlink there fails
    (EPERM), as on a volume remounted read-only (EROFS) or failing (EIO). Undone on exit."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    if subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
        pytest.skip("chattr +i refused here (needs root, and ext4, xfs or btrfs)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def test_a_read_only_spool_raises_only_spool_errors_and_spooling_resumes_after(tmp_path):
    """Before, the failed write's segment could not be unlinked, nor the acks file opened again: a plain
    OSError left sync(), which killed the scheduler sidecar."""
    box, r0 = Outbox(tmp_path, STREAM, 1 << 30), req("r0")
    box.append(r0, {})
    box.sync()
    box.ack(r0.event_id)  # its segment is the current one: it stays, with nothing live in it
    with read_only(box.dir):
        box.append(req("r1"), {})  # buffered
        with pytest.raises(SpoolError) as e:
            box.sync()  # the write fails, then the acks' reopening, then the unlink of the emptied segment
        assert e.value.requests == 1
        with pytest.raises(SpoolError):
            box.append(req("r2"), {})  # a new segment cannot be created
        box.sync()
    box.append(req("r3"), {})  # the disk works again
    box.sync()
    box.close()
    # r0's acknowledgement and its segment's deletion were lost with the disk: a repeat, never a loss
    assert [r.request_id for r, _ in Outbox(tmp_path, STREAM, 1 << 30).take_replay()] == ["r0", "r3"]


def test_a_segment_that_cannot_be_deleted_after_its_acks_is_logged_once_and_left(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("publisher.sidecar.outbox.SEGMENT_BYTES", 1)  # one record per segment
    box, reqs = Outbox(tmp_path, STREAM, 1 << 30), [req(f"r{i}") for i in range(3)]
    for r in reqs:
        box.append(r, {})
    box.sync()
    with read_only(box.dir), caplog.at_level(logging.WARNING, "vllm_mm_events.outbox"):
        box.ack(reqs[0].event_id)  # before: PermissionError out of ack(), in the sink's delivery callback
        box.ack(reqs[1].event_id)
    assert sum("cannot delete" in m for m in caplog.messages) == 1, caplog.messages
    box.close()  # the acks are written now
    again = Outbox(tmp_path, STREAM, 1 << 30)
    assert [r.request_id for r, _ in again.take_replay()] == ["r2"]
    assert sorted(p.name for p in again.dir.glob("*.seg")) == ["3.seg"]  # the acknowledged ones went at the start


def test_foreign_files_in_a_slot_are_skipped_with_a_warning(tmp_path, caplog):
    box = Outbox(tmp_path, STREAM, 1 << 30)
    box.append(req("r0"), {})
    box.close()
    for name in ("notes.seg", "x.tmp", "1.seg.tmp"):
        (box.dir / name).write_text("not mine")
    with caplog.at_level(logging.WARNING, "vllm_mm_events.outbox"):
        again = Outbox(tmp_path, STREAM, 1 << 30)  # before: ValueError: invalid literal for int() ... 'notes'
    assert [r.request_id for r, _ in again.take_replay()] == ["r0"]
    assert [m for m in caplog.messages if "notes.seg" in m] and (box.dir / "notes.seg").exists()


def _record(payload: bytes) -> bytes:
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def test_unreadable_records_inside_a_segment_set_it_aside_and_the_rest_is_replayed(tmp_path, caplog):
    """Before, a bad CRC inside a segment was logged as a torn record at its end and every record after it
    was lost."""
    box = Outbox(tmp_path, STREAM, 1 << 30)
    for i in range(4):
        box.append(req(f"r{i}"), {})
    box.close()
    (seg,) = box.dir.glob("*.seg")
    data = bytearray(seg.read_bytes())
    at = data.index(b'"r1"')  # r1's payload: the disk flipped a byte
    data[at + 1] ^= 0x20
    seg.write_bytes(bytes(data) + _record(b'{"req": "not a request"}') + _record(_encode(req("r4"), {})))
    with caplog.at_level(logging.ERROR, "vllm_mm_events.outbox"):
        again = Outbox(tmp_path, STREAM, 1 << 30)
    assert [r.request_id for r, _ in again.take_replay()] == ["r0", "r2", "r3", "r4"]
    (line,) = [m for m in caplog.messages if "1.seg" in m]
    assert "2 unreadable" in line and "1.seg.corrupt" in line, line
    assert (box.dir / "1.seg.corrupt").read_bytes()[:len(data)] == data  # kept as it was
    again.close()  # crashed before any was acknowledged: the segment kept every record that read
    caplog.clear()
    with caplog.at_level(logging.ERROR, "vllm_mm_events.outbox"):
        assert [r.request_id for r, _ in Outbox(tmp_path, STREAM, 1 << 30).take_replay()] == ["r0", "r2", "r3", "r4"]
    # nothing set aside again (this test's own tmp_path holds the word "unreadable": match the message)
    assert not [m for m in caplog.messages if "unreadable record" in m]


def test_a_record_from_a_newer_release_is_replayed_without_the_fields_it_does_not_know(tmp_path):
    """Before, ``FinishedRequest(**record)`` refused the extra field: the record was skipped, and lost with its
    segment once the others were acknowledged."""
    box, r0, r1 = Outbox(tmp_path, STREAM, 1 << 30), req("r0"), req("r1")
    box.append(r0, {})
    box.close()
    newer = json.loads(_encode(r1, {"a": "k"}))
    newer["req"]["priority"] = 3
    newer["req"]["items"][0]["crop"] = [0, 0, 8, 8]
    with open(next(box.dir.glob("*.seg")), "ab") as f:
        f.write(_record(json.dumps(newer).encode()))
    assert Outbox(tmp_path, STREAM, 1 << 30).take_replay() == [(r0, {}), (r1, {"a": "k"})]


def test_unlocked_slots_of_the_stream_are_replayed_once_by_the_next_publisher(tmp_path):
    """Two publishers (two engines) stopped with events unacknowledged; one is started again: it takes the
    lowest free slot and, before, never replayed the other's."""
    a, b = Outbox(tmp_path, STREAM, 1 << 30), Outbox(tmp_path, STREAM, 1 << 30)
    for i in range(3):
        a.append(req(f"a{i}"), {})
        b.append(rb := req(f"b{i}"), {})
        if i == 1:
            b1 = rb
    a.sync()
    b.sync()
    b.ack(b1.event_id)
    a.close()
    b.close()
    one = Outbox(tmp_path, STREAM, 1 << 30)
    replay = one.take_replay()
    assert sorted(r.request_id for r, _ in replay) == ["a0", "a1", "a2", "b0", "b2"]
    assert not list(b.dir.glob("*.seg"))  # the adopted segments are this publisher's now
    one.close()  # crashed: they are replayed again, and only by one publisher
    again, other = Outbox(tmp_path, STREAM, 1 << 30), Outbox(tmp_path, STREAM, 1 << 30)
    assert sorted(r.request_id for r, _ in again.take_replay()) == ["a0", "a1", "a2", "b0", "b2"]
    assert other.take_replay() == []
    for r, _ in replay:
        again.ack(r.event_id)
    again.close()
    other.close()
    assert Outbox(tmp_path, STREAM, 1 << 30).take_replay() == []


def test_spools_of_other_event_sinks_are_named_at_start(tmp_path, caplog):
    old = Outbox(tmp_path, "kafka://old-broker:9092/events", 1 << 30)
    old.append(req("r0"), {})
    old.close()
    with caplog.at_level(logging.WARNING, "vllm_mm_events.outbox"):
        Outbox(tmp_path, STREAM, 1 << 30).close()
    (line,) = [m for m in caplog.messages if str(old.dir) in m]  # before: nothing said
    assert "1 segment file" in line and "event_sink" in line, line
