"""Hostile events, between good ones, on a real Kafka topic and in the event log: the consumer never
exits, dead-letters each bad one with its reason, indexes every good one, and opens nothing outside
its configured object store."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import time
import uuid

import pytest

from consumers.sinks import open_vector_sink
from consumers.vectors import point_id
from publisher.event_sinks.avro_file import AvroFileSink
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec
from schemas.objects import encode_array

import consumer_run as cr
import synth

pytestmark = pytest.mark.e2e
MAX_OBJECT = 1 << 20
NUL_METADATA = {"note": "a\x00b", "k\x00": "v"}


def untouched(path):
    """Set the file's access time before its modification time: a read then moves it (relatime)."""
    st = os.stat(path)
    os.utime(path, (st.st_mtime - 3600, st.st_mtime))
    return os.stat(path).st_atime


class Scene:
    """A local store with good events, hostile ones (each with the reason it must be dead-lettered
    for), and a canary file outside the store that must never be read."""

    def __init__(self, tmp_path):
        self.dir = tmp_path / "objects"
        self.store = LocalDirStore(self.dir)
        outside = tmp_path / "outside"
        outside.mkdir()
        self.canary = outside / "canary.safetensors"
        self.canary.write_bytes(encode_array(synth.features(999), storage_dtype="float32", mm_hash="c",
                                             modality="image", model=synth.MODEL).data)
        self.control = outside / "control.bin"  # proves the filesystem records reads at all
        self.control.write_bytes(b"x" * 100)
        self.good: list[dict] = []
        self.hostile: list[tuple[str, dict]] = []  # (expected reason, event)
        for i in range(4):
            self.good.append(synth.make_event(self.store, "p", f"good-{i}", [synth.features(i)])[0])
        self.good.append(synth.make_event(self.store, "p", "good-nul", [synth.features(50)], NUL_METADATA)[0])
        canary = {"uri": self.canary.as_uri(), "sha256": hashlib.sha256(self.canary.read_bytes()).hexdigest(),
                  "size_bytes": self.canary.stat().st_size}
        (self.dir / "p" / "link.safetensors").symlink_to(self.canary)
        (self.dir / "p" / "a-directory").mkdir()
        os.mkfifo(self.dir / "p" / "a-fifo")
        big = self.dir / "p" / "big.safetensors"
        big.write_bytes(b"\0" * (2 * MAX_OBJECT))
        bad_header = json.dumps({"embedding": {"dtype": "F32", "shape": [1, 4], "data_offsets": ["zero", 16]}})
        bad_header = bad_header.encode() + b" " * (-len(bad_header) % 8)
        bad = struct.pack("<Q", len(bad_header)) + bad_header + b"\0" * 16
        (self.dir / "p" / "bad.safetensors").write_bytes(bad)
        # a well-formed embedding whose extras list, JSON inside the header's JSON, nests past any parser's depth
        deep_header = json.dumps({"embedding": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
                                  "__metadata__": {"extra_tensors": "[" * 100_000}})
        deep_header = deep_header.encode() + b" " * (-len(deep_header) % 8)
        deep = struct.pack("<Q", len(deep_header)) + deep_header + b"\0" * 16
        (self.dir / "p" / "deep.safetensors").write_bytes(deep)
        store_uri = self.dir.as_uri()
        cases = [
            ("forbidden_object", canary),
            ("forbidden_object", {**canary, "uri": f"{store_uri}/p/%2e%2e/%2e%2e/outside/canary.safetensors"}),
            ("forbidden_object", {**canary, "uri": f"{store_uri}/p/link.safetensors"}),
            ("forbidden_object", {"uri": "s3://another-bucket/k.safetensors"}),
            ("forbidden_object", {"uri": "file:///dev/zero", "size_bytes": 1000}),
            # no file system holds the name (ENAMETOOLONG): not a store that is away, retried for good
            ("forbidden_object", {"uri": f"{store_uri}/p/{'x' * 300}.safetensors"}),
            ("object_too_large", {"size_bytes": 10 ** 12}),
            ("object_too_large", {"uri": big.as_uri(), "size_bytes": 1000}),
            ("permanent_error", {"uri": f"{store_uri}/p/a-directory"}),
            ("permanent_error", {"uri": f"{store_uri}/p/a-fifo"}),
            ("bad_object", {"uri": f"{store_uri}/p/bad.safetensors", "size_bytes": len(bad), "shape": [1, 4],
                            "sha256": hashlib.sha256(bad).hexdigest()}),  # its header is what is wrong
            ("bad_object", {"uri": f"{store_uri}/p/deep.safetensors", "size_bytes": len(deep), "shape": [1, 4],
                            "sha256": hashlib.sha256(deep).hexdigest()}),
        ]
        for n, (reason, change) in enumerate(cases):
            e = synth.make_event(self.store, "p", f"bad-{n}-{reason}", [synth.features(100 + n)])[0]
            e["embeddings"][0].update(change)
            self.hostile.append((reason, e))
        self.long_id = synth.make_event(self.store, "p", secrets.token_hex(5000), [synth.features(60)])[0]
        self.atimes = {p: untouched(p) for p in (self.canary, self.control)}

    def interleaved(self, extra_bad: list[dict] = ()) -> list[dict]:
        bad = [e for _, e in self.hostile] + list(extra_bad)
        out = []
        for i in range(max(len(self.good), len(bad))):
            out += self.good[i:i + 1] + bad[i:i + 1]
        return out

    def expected_reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reason, _ in self.hostile:
            out[reason] = out.get(reason, 0) + 1
        return out

    def check_nothing_outside_was_read(self) -> None:
        with open(self.control, "rb") as f:
            f.read()
        if os.stat(self.control).st_atime != self.atimes[self.control]:  # this filesystem records reads
            assert os.stat(self.canary).st_atime == self.atimes[self.canary], "the canary was read"


def ids(events):
    return {point_id(e["event_id"], it["item_index"]) for e in events for it in e["embeddings"]}


def consume(scene, source, sinks, dlq, extra_env=None):
    args = ["--source", source, "--group", "hostile", "--object-store", scene.dir.as_uri(),
            "--max-object-bytes", str(MAX_OBJECT), "--dlq", dlq.as_uri(), "--batch-max-records", "5"]
    for s in sinks:
        args += ["--sink", s]
    env = {"VLLM_MM_EVENTS_PERMANENT_ERROR_RETRIES": "1", **(extra_env or {})}
    summary, log = cr.consume_once(args, env)
    reasons = [json.loads(x)["reason"] for x in dlq.read_text().splitlines()]
    return summary, log, reasons


def test_hostile_events_on_kafka_into_every_sink(tmp_path, kafka, postgres, monkeypatch):
    for k, v in postgres.env.items():  # this process reads the table too
        monkeypatch.setenv(k, v)
    scene = Scene(tmp_path)
    events = scene.interleaved([scene.long_id])
    topic = f"hostile.{uuid.uuid4().hex[:6]}"
    cr.create_topic(kafka.bootstrap, topic, 1)
    codec = AvroCodec()
    cr.produce(kafka.bootstrap, topic, [(e["request_id"][:100].encode(), codec.encode(e), 0) for e in events])
    table = f"hostile_{uuid.uuid4().hex[:6]}"
    # pgvector first: the event it refuses (a request id too long for its index) reaches no other sink.
    sinks = [postgres.uri(table), f"qdrant://{tmp_path}/q/h", f"milvus://{tmp_path}/m.db/h",
             f"lancedb://{tmp_path}/l/h"]
    t0 = time.monotonic()
    summary, log, reasons = consume(scene, f"kafka://{kafka.bootstrap}/{topic}", sinks, tmp_path / "dlq.jsonl",
                                    postgres.env)
    want = {**scene.expected_reasons(), "sink_rejected": 1}
    assert summary["dead_lettered"] == want, (summary, log[-4000:])
    assert summary["consumed"] == summary["committed"] == len(events)
    assert sorted(reasons) == sorted(r for r, n in want.items() for _ in range(n))
    assert time.monotonic() - t0 < 120  # nothing retried for ever
    good = ids(scene.good)
    for uri in sinks:
        with open_vector_sink(uri) as s:
            assert s.count() == len(good) and set(s.retrieve(sorted(good))) == good, uri
    with open_vector_sink(sinks[0]) as pg:  # NUL stored escaped, not dropped
        (nul,) = [p for p in pg.retrieve(sorted(good)).values() if p["request_id"] == "good-nul"]
        assert nul["metadata"] == {"note": "a\\u0000b", "k\\u0000": "v"}
    assert "refused event" in log  # the store's message is logged
    scene.check_nothing_outside_was_read()


def test_hostile_events_and_blocks_in_the_event_log(tmp_path):
    scene = Scene(tmp_path)
    log_path = tmp_path / "events.avro"
    sink = AvroFileSink(log_path, AvroCodec())
    events = scene.interleaved()
    for e in events[: len(events) // 2]:
        sink.publish(e, lambda err: None)
    assert sink.flush(5) == 0
    with open(log_path, "rb") as f:  # the file's sync marker, from its header
        f.seek(-16, os.SEEK_END)
        sync = f.read(16)
    with open(log_path, "ab") as f:  # a block no writer produces: negative count and length
        f.write(b"\x01\x09garbage" + sync)
    for e in events[len(events) // 2:]:
        sink.publish(e, lambda err: None)
    assert sink.flush(5) == 0
    sink_uri = f"lancedb://{tmp_path}/l/log"
    summary, log, reasons = consume(scene, log_path.as_uri(), [sink_uri], tmp_path / "dlq.jsonl")
    want = {**scene.expected_reasons(), "undecodable": 1}
    assert summary["dead_lettered"] == want, (summary, log[-4000:])
    assert sorted(reasons) == sorted(r for r, n in want.items() for _ in range(n))
    with open_vector_sink(sink_uri) as s:
        assert s.count() == len(scene.good) and set(s.retrieve(sorted(ids(scene.good)))) == ids(scene.good)
    scene.check_nothing_outside_was_read()
