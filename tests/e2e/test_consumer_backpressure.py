"""A slow sink: the consumer pauses its partitions instead of reading ahead, so what it holds
stays bounded by about two batches, and everything is still indexed and committed once."""

from __future__ import annotations

import time
import uuid

import pytest

from consumers.config import ConsumerConfig
from consumers.dead_letters import LoggedDeadLetters
from consumers.decoder import EventDecoder
from consumers.indexer import Indexer
from consumers.metrics import ConsumerMetrics
from consumers.objects import ObjectFetcher
from consumers.sinks.lancedb import LanceDBSink
from consumers.sources.kafka import KafkaSource
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec

import consumer_run as cr
import synth

pytestmark = pytest.mark.e2e
N, BATCH = 60, 5


class SlowLance(LanceDBSink):
    def upsert(self, points):
        time.sleep(0.25)
        super().upsert(points)


def test_slow_sink_pauses_partitions_and_bounds_memory(kafka, tmp_path):
    store, codec = LocalDirStore(tmp_path / "objects"), AvroCodec()
    topic = f"slow.{uuid.uuid4().hex[:6]}"
    cr.create_topic(kafka.bootstrap, topic, 3)
    events = [synth.make_event(store, "p", f"r{i}", [synth.features(i)])[0] for i in range(N)]
    cr.produce(kafka.bootstrap, topic, [(e["request_id"].encode(), codec.encode(e), i % 3)
                                        for i, e in enumerate(events)])

    cfg = ConsumerConfig.load({"source": f"kafka://{kafka.bootstrap}/{topic}", "sinks": [f"lancedb://{tmp_path}/l/t"],
                               "batch_max_records": BATCH, "batch_linger_ms": 2000, "metrics_port": 0}, environ={})
    source = KafkaSource(cfg.source, "slow-" + uuid.uuid4().hex[:6], {})
    sink = SlowLance(cfg.sinks[0])
    indexer = Indexer(cfg, source, [sink], LoggedDeadLetters(),
                      ObjectFetcher([store.uri("")]), ConsumerMetrics(), EventDecoder())

    pauses, held = [], []
    real_pause, real_add = source.pause, indexer._add

    def pause():
        pauses.append(time.monotonic())
        real_pause()

    def add(records):
        real_add(records)
        held.append(len(indexer._batch) + (len(indexer._inflight.entries) if indexer._inflight else 0))

    source.pause, indexer._add = pause, add
    try:
        totals = indexer.run(once=True)
    finally:
        indexer.close()
        source.close()
    assert totals.consumed == totals.committed == N and totals.indexed == N
    assert sink.count() == N
    assert len(pauses) >= N // BATCH // 2  # paused whenever a full batch waited for the writer
    assert max(held) <= 2 * BATCH, max(held)  # never read ahead of the slow sink


def test_batches_stay_within_batch_max_bytes(kafka, tmp_path):
    """One poll may return far more than ``batch_max_bytes`` of objects (a backlog of 4.7 MB events):
    the batch is cut at the cap and the rest goes in the next ones, in order, each committed once."""
    store, codec = LocalDirStore(tmp_path / "objects"), AvroCodec()
    topic = f"bytes.{uuid.uuid4().hex[:6]}"
    cr.create_topic(kafka.bootstrap, topic, 1)
    events = [synth.make_event(store, "p", f"r{i}", [synth.features(i, n=16, dim=16)])[0] for i in range(30)]
    size = events[0]["embeddings"][0]["size_bytes"]
    cap = 3 * size + size // 2
    cr.produce(kafka.bootstrap, topic, [(e["request_id"].encode(), codec.encode(e), 0) for e in events])

    cfg = ConsumerConfig.load({"source": f"kafka://{kafka.bootstrap}/{topic}", "sinks": [f"lancedb://{tmp_path}/l/t"],
                               "batch_max_bytes": cap, "batch_linger_ms": 5000, "metrics_port": 0}, environ={})
    source = KafkaSource(cfg.source, "bytes-" + uuid.uuid4().hex[:6], {})
    sink = LanceDBSink(cfg.sinks[0])
    indexer = Indexer(cfg, source, [sink], LoggedDeadLetters(),
                      ObjectFetcher([store.uri("")]), ConsumerMetrics(), EventDecoder())
    written, real_write = [], indexer._write

    def write(entries, abandon):
        written.append([e.event["request_id"] for e in entries])
        return real_write(entries, abandon)
    indexer._write = write
    try:
        totals = indexer.run(once=True)
    finally:
        indexer.close()
        source.close()
    assert totals.consumed == totals.committed == totals.indexed == 30 and sink.count() == 30
    assert max(len(b) for b in written) == 3, written  # 3 objects fit in the cap, a 4th would not
    assert [r for b in written for r in b] == [f"r{i}" for i in range(30)]  # in order, each once
