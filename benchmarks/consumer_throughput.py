"""Consumer throughput against each sink's raw client, in the same run.

    .venv/bin/python benchmarks/consumer_throughput.py [--events 2000] [--features 64] [--hidden 1024]

Events and objects are made with the publisher's own code (local directory store, so the
object store is not what is measured), produced to a real Kafka broker, then:
- store alone: the same points (ids, pooled vectors, payloads precomputed, outside the
  timing) written in batches of 256 by the store's own client, through the sink's thin
  ``upsert`` (one merge_insert / upsert / executemany call): what the store itself costs;
- consumer: the full ``Indexer`` from an empty group to "caught up and committed": Kafka
  reads, Avro decoding, object reads, SHA-256 and shape checks, pooling, upserts, commits.
Prints points/s for both and the ratio, and the consumer's peak RSS growth.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--sinks", default="lancedb,qdrant,pgvector,milvus")
    args = ap.parse_args()

    import numpy as np

    from consumers.config import ConsumerConfig
    from consumers.dead_letters import LoggedDeadLetters
    from consumers.decoder import EventDecoder
    from consumers.indexer import Indexer
    from consumers.metrics import ConsumerMetrics
    from consumers.objects import ObjectFetcher
    from consumers.sinks import open_vector_sink
    from consumers.sources.kafka import KafkaSource
    from consumers.vectors import Point, point_id, point_payload, pool
    from publisher.stores.local import LocalDirStore
    from schemas.codec import AvroCodec

    import consumer_run as cr
    import services
    import synth

    work = Path(tempfile.mkdtemp(prefix="consumer-bench-"))
    kafka = services.KafkaBroker().start()
    pg = services.PostgresServer().start() if "pgvector" in args.sinks else None
    import os

    if pg:
        os.environ.update(pg.env)
    store, codec = LocalDirStore(work / "objects", fsync=False), AvroCodec()
    topic = "bench"
    cr.create_topic(kafka.bootstrap, topic, 3)
    events, points = [], []
    rng = np.random.default_rng(0)
    for i in range(args.events):
        f = rng.standard_normal((args.features, args.hidden)).astype(np.float32)
        ev, _ = synth.make_event(store, "b", f"r{i}", [f], {"tenant": "bench"})
        events.append(ev)
        it = ev["embeddings"][0]
        points.append(Point(point_id(ev["event_id"], 0), pool(f, "mean", False), point_payload(ev, it, "mean")))
    cr.produce(kafka.bootstrap, topic, [(e["request_id"].encode(), codec.encode(e), None) for e in events])
    obj_mb = args.events * args.features * args.hidden * 4 / 1e6
    print(f"{args.events} events, one {args.features}x{args.hidden} float32 object each ({obj_mb:.0f} MB), "
          f"Kafka {services.KAFKA_VERSION}, 3 partitions\n")
    print(f"{'sink':<10} {'store alone pts/s':>17} {'consumer pts/s':>15} {'ratio':>6} "
          f"{'consumer RSS +MB':>17} {'batch size':>10}")

    def uri(kind, name):
        return {"lancedb": f"lancedb://{work}/lance/{name}", "qdrant": f"qdrant://{work}/qdrant-{name}/{name}",
                "pgvector": pg.uri(name) if pg else "", "milvus": f"milvus://{work}/{name}.db/{name}"}[kind]

    for kind in args.sinks.split(","):
        raw = open_vector_sink(uri(kind, "raw"))
        raw.ensure(args.hidden, False)
        t0 = time.perf_counter()
        for i in range(0, len(points), 256):
            raw.upsert(points[i:i + 256])
        raw_rate = len(points) / (time.perf_counter() - t0)
        raw.close()

        cfg = ConsumerConfig.load({"source": f"kafka://{kafka.bootstrap}/{topic}", "sinks": [uri(kind, "cons")],
                                   "metrics_port": 0}, environ={})
        source = KafkaSource(cfg.source, f"bench-{uuid.uuid4().hex[:6]}", {})
        sink = open_vector_sink(cfg.sinks[0])
        idx = Indexer(cfg, source, [sink], LoggedDeadLetters(),
                      ObjectFetcher([store.uri("")]), ConsumerMetrics(), EventDecoder())
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assigned_at = []  # the clock starts when the group hands out partitions (join time excluded)
        on_assign = source._on_assign
        source._on_assign = lambda c, p: (assigned_at.append(time.perf_counter()), on_assign(c, p))
        source.consumer.subscribe([topic], on_assign=source._on_assign, on_revoke=source._on_revoke)
        totals = idx.run(once=True)
        rate = totals.indexed / (time.perf_counter() - assigned_at[0])
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        n_batches = idx.metrics.batch_records._sum.get() and sum(b.get() for b in idx.metrics.batch_records._buckets)
        assert totals.committed == args.events and sink.count() == args.events
        idx.close()
        source.close()
        sink.close()
        print(f"{kind:<10} {raw_rate:>17,.0f} {rate:>15,.0f} {rate / raw_rate:>6.2f} {rss:>17.0f} "
              f"{totals.committed / n_batches:>10.0f}")
    kafka.stop()
    if pg:
        pg.stop()


if __name__ == "__main__":
    main()
