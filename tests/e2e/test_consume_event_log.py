"""The embedded default: the publisher's Avro event log (written by its own AvroFileSink),
followed as it grows, with a checkpoint and a dead-letter file."""

from __future__ import annotations

import base64
import json
import os
import signal

import pytest

from consumers.sinks import open_vector_sink
from consumers.sources.event_log import AvroLogSource
from consumers.vectors import point_id
from publisher.event_sinks.avro_file import AvroFileSink
from publisher.stores.local import LocalDirStore
from schemas import event_schema
from schemas.codec import AvroCodec

import consumer_run as cr
import synth

pytestmark = pytest.mark.e2e


class Log:
    def __init__(self, d):
        self.dir = d
        self.path = d / "events.avro"
        self.store = LocalDirStore(d / "objects")
        self.objects = (d / "objects").as_uri()  # the consumer reads objects only from here
        self.sink = AvroFileSink(self.path, AvroCodec())
        self.events = []

    def append(self, n: int, items: int = 1) -> list[dict]:
        """One block of n events (the publisher writes a block per flush)."""
        batch = []
        for _ in range(n):
            i = len(self.events)
            ev, _ = synth.make_event(self.store, "p", f"req-{i}", [synth.features(1000 * i + j) for j in range(items)],
                                     {"n": str(i)})
            self.events.append(ev)
            batch.append(ev)
            self.sink.publish(ev, lambda err: None)
        assert self.sink.flush(5) == 0
        return batch

    def ids(self, events=None):
        return {point_id(e["event_id"], it["item_index"]) for e in (events or self.events) for it in e["embeddings"]}


def count(uri):
    s = open_vector_sink(uri)
    try:
        return s.count() if s.describe() else 0
    finally:
        s.close()


def test_follows_the_log_as_it_grows_and_resumes_from_its_checkpoint(tmp_path):
    from services import free_port

    log = Log(tmp_path)
    log.append(3, items=2)
    sink = f"lancedb://{tmp_path}/lance/follow"
    port = free_port()
    args = ["--source", log.path.as_uri(), "--object-store", log.objects, "--sink", sink, "--group", "idx",
            "--batch-linger-ms", "20"]
    proc = cr.start([*args, "--metrics-port", str(port)], {}, tmp_path / "follow.log")
    try:
        cr.wait_for(lambda: count(sink) == 6, 60, "the first 3 events")
        log.append(4)
        cr.wait_for(lambda: count(sink) == 10, 30, "4 more events appended while following")
        log.append(1, items=3)
        cr.wait_for(lambda: count(sink) == 13, 30, "a third block")
        assert cr.metric(cr.scrape(port)[1], "vllm_mm_events_consumer_events_consumed_total") == 8
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, (tmp_path / "follow.log").read_text()[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"consumed": 8, "indexed": 13, "committed": 8,
                                                        "dead_lettered": {}}
    ck = json.loads((tmp_path / "events.avro.idx.checkpoint").read_text())
    assert ck["offset"] == os.path.getsize(log.path) and ck["index"] == 0

    summary, _ = cr.consume_once(args)  # nothing new: the checkpoint holds
    assert summary["consumed"] == 0
    log.append(2)
    summary, _ = cr.consume_once(args)
    assert summary == {"consumed": 2, "indexed": 2, "committed": 2, "dead_lettered": {}}
    s = open_vector_sink(sink)
    assert s.count() == 15 and set(s.retrieve(sorted(log.ids()))) == log.ids()
    s.close()


def test_a_block_still_being_written_is_not_read_until_complete(tmp_path):
    log = Log(tmp_path)
    log.append(2)
    whole = log.path.read_bytes()
    log.append(3)
    block = log.path.read_bytes()[len(whole):]
    log.path.write_bytes(whole + block[: len(block) // 2])  # the writer is halfway through its append
    src = AvroLogSource(log.path.as_uri(), "g", None, event_schema())
    first = src.poll(100, 0.2)
    assert [r.event["request_id"] for r in first] == ["req-0", "req-1"]
    assert src.poll(100, 0.2) == [] and src.caught_up()
    with open(log.path, "ab") as f:
        f.write(block[len(block) // 2:])
    assert [r.event["request_id"] for r in src.poll(100, 0.5)] == ["req-2", "req-3", "req-4"]
    src.commit(first)  # commit mid-way: a new reader resumes after req-1
    again = AvroLogSource(log.path.as_uri(), "g", None, event_schema())
    assert [r.event["request_id"] for r in again.poll(100, 0.2)] == ["req-2", "req-3", "req-4"]


def test_poison_goes_to_the_dlq_file_and_the_rest_is_indexed(tmp_path):
    log = Log(tmp_path)
    log.append(2)
    good_len = log.path.stat().st_size
    log.append(2)  # this block gets corrupted below
    corrupt_at = log.path.stat().st_size
    missing = log.append(1)[0]  # its object is deleted below
    log.append(2)
    data = bytearray(log.path.read_bytes())
    body = good_len + 4  # inside the second block's records (past its two varint lengths)
    data[body:body + 24] = b"\xff" * 24
    log.path.write_bytes(bytes(data))
    os.remove(missing["embeddings"][0]["uri"].removeprefix("file://"))

    dlq = tmp_path / "dead.jsonl"
    sink = f"qdrant://{tmp_path}/q/poison"
    summary, _ = cr.consume_once(["--source", log.path.as_uri(), "--object-store", log.objects, "--sink", sink,
                                  "--dlq", dlq.as_uri()])
    assert summary["dead_lettered"] == {"undecodable": 1, "missing_object": 1}
    lines = [json.loads(x) for x in dlq.read_text().splitlines()]
    assert [x["reason"] for x in lines] == ["undecodable", "missing_object"]
    assert lines[0]["source"] == {"file": str(log.path), "block_offset": str(good_len), "index": "0"}
    assert int(lines[1]["source"]["block_offset"]) == corrupt_at
    assert AvroCodec().decode(base64.b64decode(lines[1]["value_b64"]))["event_id"] == missing["event_id"]
    kept = [e for e in log.events if e not in log.events[2:5]]
    s = open_vector_sink(sink)
    assert s.count() == 4 and set(s.retrieve(sorted(log.ids(kept)))) == log.ids(kept)
    s.close()
