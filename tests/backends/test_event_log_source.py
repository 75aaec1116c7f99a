"""The event-log source against hostile blocks: each is dead-lettered once, the reader never stalls or loops."""

from __future__ import annotations

import os

import fastavro
import pytest

from consumers.sources import event_log
from consumers.sources.base import SourceUnreadable
from consumers.sources.event_log import AvroLogSource
from publisher.event_sinks.avro_file import AvroFileSink
from publisher.stores.local import LocalDirStore
from schemas import event_schema
from schemas.avro_encoder import encode_long
from schemas.codec import AvroCodec

import synth


def read_all(path, polls: int = 50) -> list:
    src = AvroLogSource(path.as_uri(), "g", None, event_schema())
    out = []
    for _ in range(polls):
        out += src.poll(100, 0.05)
        if src.caught_up():
            return out
    raise AssertionError(f"no end after {polls} polls: {len(out)} records, the reader stalls or loops")


@pytest.fixture
def log(tmp_path):
    store, sink = LocalDirStore(tmp_path / "objects"), AvroFileSink(tmp_path / "events.avro", AvroCodec())

    def append(ids):
        for i in ids:
            sink.publish(synth.make_event(store, "p", f"req-{i}", [synth.features(i)])[0], lambda err: None)
        assert sink.flush(5) == 0

    return tmp_path / "events.avro", append


def sync_of(path) -> bytes:
    src = AvroLogSource(path.as_uri(), "g", None, event_schema())
    assert src._open_header()
    return src.sync


@pytest.mark.parametrize("header", [
    encode_long(-1) + encode_long(-5),  # negative count and length
    encode_long(3) + encode_long(0),  # three records in no bytes
    encode_long(1) + encode_long(1 << 40),  # a length no block can have
], ids=["negative", "empty-body", "over-cap"])
def test_an_impossible_block_header_is_one_dead_letter_and_the_rest_is_read(log, header, monkeypatch):
    monkeypatch.setattr(event_log, "MAX_BLOCK_BYTES", 1 << 20)
    path, append = log
    append([0, 1])
    with open(path, "ab") as f:
        f.write(header + b"garbage bytes" + sync_of(path))
    append([2, 3])
    records = read_all(path)
    assert [r.error is not None for r in records] == [False, False, True, False, False]
    assert [r.event["request_id"] for r in records if r.event] == ["req-0", "req-1", "req-2", "req-3"]


def test_a_block_over_the_cap_is_dead_lettered_not_waited_for(log, monkeypatch):
    """A legitimate but huge block (a client's 64 MiB of metadata) must not stall the reader for good."""
    path, append = log
    append([0])
    monkeypatch.setattr(event_log, "MAX_BLOCK_BYTES", 200)  # every real block is bigger than this
    records = read_all(path)
    assert len(records) == 1 and "over the 200-byte cap" in records[0].error


def test_a_block_of_more_records_than_the_cap_is_dead_lettered_not_decoded(log, monkeypatch):
    """A block is decoded whole: one of millions of minimal records (64 MiB of them) would take gigabytes."""
    path, append = log
    append(range(8))  # one block of 8
    append([8])
    monkeypatch.setattr(event_log, "MAX_BLOCK_RECORDS", 5)
    records = read_all(path)
    assert [r.error for r in records][0] == "block of 8 records, over the 5-record cap"
    assert [r.event["request_id"] for r in records[1:]] == ["req-8"]


def test_an_over_long_varint_in_a_block_header_is_one_dead_letter(log):
    """A varint past a long's 10 bytes was read on as an ever larger number: quadratic (seconds per poll,
    at every poll) and, past 4,300 digits, a ValueError when printed in the dead letter's reason, out of
    poll at every restart."""
    path, append = log
    append([0])
    with open(path, "ab") as f:
        f.write(b"\xff" * 3000 + b"\x02\x02" + b"garbage" + sync_of(path))
    append([1])
    records = read_all(path)
    assert [r.error is not None for r in records] == [False, True, False]
    assert "corrupt block header (count -1" in records[1].error


def test_a_header_schema_with_a_type_containing_itself_is_refused(tmp_path):
    """fastavro's reader recursed without a limit into a deep value of such a schema: a segfault."""
    path = tmp_path / "events.avro"
    node = {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]}
    with open(path, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(node), [])
    with pytest.raises(ValueError, match="the type Node contains itself"):
        AvroLogSource(path.as_uri(), "g", None, event_schema()).poll(10, 0)


def test_a_fifo_at_the_log_path_is_refused_not_waited_on(tmp_path):
    """A FIFO with no writer held the reader's open (and the consumer's loop) for good."""
    path = tmp_path / "events.avro"
    os.mkfifo(path)
    with pytest.raises(ValueError, match="is not a regular file"):
        AvroLogSource(path.as_uri(), "g", None, event_schema()).poll(10, 0)


def test_a_log_rotated_under_the_reader_is_read_to_its_end_then_the_new_one(log, tmp_path):
    """The reader read on at its offset in the new file: nothing handed out, caught up by its account (a
    --once run ended in success), the rest of the old log and all of the new one never read. Now it reads
    the old one to its end through the file it opened, then the new one from its start; its checkpoint
    follows, so a restart has nothing left."""
    path, append = log
    append(range(4))
    src = AvroLogSource(path.as_uri(), "g", None, event_schema())
    first = src.poll(2, 0.05)
    src.commit(first)
    append([4, 5])
    path.rename(tmp_path / "events.avro.1")  # rotated (the publisher does so when its schema changes)
    append([10, 11])
    assert not src.caught_up()
    rest = []
    while not src.caught_up():
        rest += src.poll(100, 0.05)
    src.commit(rest)
    ids = [r.event["request_id"] for r in first + rest]
    assert ids == ["req-0", "req-1", "req-2", "req-3", "req-4", "req-5", "req-10", "req-11"], ids
    assert [r.error for r in rest if r.error] == [] and src.lag() == 0
    src.close()
    again = AvroLogSource(path.as_uri(), "g", None, event_schema())  # the restart: resumes in the new log
    assert again.poll(100, 0.2) == [] and again.caught_up()
    append([12])
    assert [r.event["request_id"] for r in again.poll(100, 1)] == ["req-12"]


def test_a_log_truncated_under_the_reader_stops_it_with_the_reason(log):
    path, append = log
    append(range(4))
    src = AvroLogSource(path.as_uri(), "g", None, event_schema())
    assert len(read_all(path)) == 4 and len(src.poll(100, 0.05)) == 4
    os.truncate(path, 100)
    with pytest.raises(SourceUnreadable, match="was truncated under the reader"):
        src.poll(100, 0.05)


def test_the_consumer_stops_on_an_unreadable_source_with_the_reason_not_a_traceback(tmp_path, capsys):
    from consumers.cli import EXIT_FAILED, main

    path = tmp_path / "events.avro"
    os.mkfifo(path)
    rc = main(["consume", "--source", path.as_uri(), "--sink", f"lancedb://{tmp_path}/db/t", "--once",
               "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert rc == EXIT_FAILED and "consume: source:" in err and "is not a regular file" in err, err
    assert "Traceback" not in err


def test_a_block_cut_short_is_cut_off_before_the_next_one(tmp_path, caplog):
    """A publisher killed in the middle of a block (or a full disk) left it torn; the next flush appended after
    it, and readers, finding a block's end by the sync marker, read both as one corrupt block: the next
    flush's events, acknowledged as delivered, were lost. Now the torn block is cut off first; its events
    (never acknowledged) come again from the outbox."""
    path, store = tmp_path / "events.avro", LocalDirStore(tmp_path / "objects")

    def flush(sink, ids) -> list:
        errors = []
        for i in ids:
            sink.publish(synth.make_event(store, "p", f"req-{i}", [synth.features(i)])[0], errors.append)
        sink.flush(5)
        return errors

    assert flush(AvroFileSink(path, AvroCodec()), [0, 1]) == [None, None]
    before = path.stat().st_size
    flush(AvroFileSink(path, AvroCodec()), [2, 3])
    os.truncate(path, before + (path.stat().st_size - before) // 2)  # killed in the middle of the block
    restarted = AvroFileSink(path, AvroCodec())
    assert flush(restarted, [2, 3]) == [None, None]  # replayed from the outbox
    assert flush(restarted, [4]) == [None]
    records = read_all(path)
    assert [r.error for r in records if r.error] == []
    assert [r.event["request_id"] for r in records] == ["req-0", "req-1", "req-2", "req-3", "req-4"]
    assert "ended in a block cut short" in caplog.text


@pytest.mark.parametrize("cut", [3, 40])
def test_a_header_cut_short_starts_the_log_again(tmp_path, cut):
    """Every later flush failed ("cannot read header"), for good: nothing was published again."""
    path, store = tmp_path / "events.avro", LocalDirStore(tmp_path / "objects")
    sink = AvroFileSink(tmp_path / "whole.avro", AvroCodec())
    sink.publish(synth.make_event(store, "p", "req-0", [synth.features(0)])[0], lambda err: None)
    sink.flush(5)
    path.write_bytes((tmp_path / "whole.avro").read_bytes()[:cut])  # killed while writing the header
    errors: list = []
    sink = AvroFileSink(path, AvroCodec())
    sink.publish(synth.make_event(store, "p", "req-1", [synth.features(1)])[0], errors.append)
    sink.flush(5)
    assert errors == [None]
    assert [r.event["request_id"] for r in read_all(path)] == ["req-1"]


def test_a_log_of_an_earlier_release_is_moved_aside_and_no_field_is_dropped(tmp_path):
    """A container file has one schema: appending to a log an earlier release started (v1, without
    ``reused`` and ``extra_tensors``) wrote this release's events with that schema, their new fields
    dropped. The log is moved aside; a consumer reading it reads it to its end, then the new log."""
    from schemas import released_schemas

    path, store = tmp_path / "events.avro", LocalDirStore(tmp_path / "objects")
    v1 = dict(released_schemas())["v1"]
    old = [synth.make_event(store, "p", f"req-{i}", [synth.features(i)])[0] for i in range(2)]
    with open(path, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(v1), old)
    src = AvroLogSource(path.as_uri(), "g", None, event_schema())
    assert [r.event["request_id"] for r in src.poll(1, 0.05)] == ["req-0"]
    new = synth.make_event(store, "p", "req-2", [synth.features(2)])[0]
    new["embeddings"][0]["reused"] = True
    errors: list = []
    sink = AvroFileSink(path, AvroCodec())
    sink.publish(new, errors.append)
    sink.flush(5)
    assert errors == [None]
    assert len(list(tmp_path.glob("events.avro.2*"))) == 1  # the v1 log, moved aside
    rest = []
    while not src.caught_up():
        rest += src.poll(100, 0.05)
    assert [r.event["request_id"] for r in rest] == ["req-1", "req-2"]
    assert rest[1].event["embeddings"][0]["reused"] is True  # kept: written with this release's schema
    sink.publish(synth.make_event(store, "p", "req-3", [synth.features(3)])[0], errors.append)
    sink.flush(5)
    assert len(list(tmp_path.glob("events.avro.2*"))) == 1  # moved aside once
    assert [r.event["request_id"] for r in src.poll(100, 1)] == ["req-3"]


def test_a_reader_stopped_across_a_rotation_finishes_the_old_log_then_reads_the_new_one(tmp_path):
    """Its checkpoint is of the log moved aside while it was stopped (an upgrade: the new publisher moves a
    log of the earlier release aside at its first flush). It read the new log from its start and the rest of
    the old one never; now it finds the old one beside the path by its sync marker and finishes it first."""
    from schemas import released_schemas

    path, store = tmp_path / "events.avro", LocalDirStore(tmp_path / "objects")
    v1 = dict(released_schemas())["v1"]
    with open(path, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(v1),
                        [synth.make_event(store, "p", f"req-{i}", [synth.features(i)])[0] for i in range(4)])
    with AvroLogSource(path.as_uri(), "g", None, event_schema()) as src:
        src.commit(src.poll(2, 0.05))  # req-0, req-1; then the consumer stops
    sink = AvroFileSink(path, AvroCodec())  # the upgraded publisher
    sink.publish(synth.make_event(store, "p", "req-10", [synth.features(10)])[0], lambda err: None)
    sink.flush(5)
    with AvroLogSource(path.as_uri(), "g", None, event_schema()) as src:
        got = []
        while not src.caught_up():
            got += src.poll(100, 0.05)
        assert [r.event["request_id"] for r in got] == ["req-2", "req-3", "req-10"]
