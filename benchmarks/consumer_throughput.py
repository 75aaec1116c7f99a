"""Consumer throughput, in one run, on the same data: the store alone, a hand-written script, the project's consumer.

    .venv/bin/python benchmarks/consumer_throughput.py [--quick] [--sinks lancedb,qdrant,pgvector,milvus]
        [--sizes 128KB,4.7MB] [--events 128KB=1000,4.7MB=120] [--profile] [--scaling | --no-scaling] [--json PATH]
        [--bootstrap HOST:PORT] [--endpoint URL] [--pgvector pgvector://user@host:port/db]

Starts Kafka, MinIO and (for pgvector) PostgreSQL, unless ``--bootstrap``, ``--endpoint`` (credentials: AWS_*) and
``--pgvector`` (password: PGPASSWORD) name running ones. For each object size it makes one data set with the
publisher's own code (``encode_array``, ``build_event``, ``AvroCodec``): one object per event in MinIO, the
events on a topic of 4 partitions. Sizes: ``128KB`` (64 x 512 float32) and ``4.7MB`` (576 x 4096 bfloat16, what
LLaVA-1.5-7B's encoder gives one image). Then, per sink and size, on that same data:

- store alone: the same points (ids, pooled vectors, payloads precomputed, outside the timing) written in
  batches of 256 through the sink's thin ``upsert`` (one merge_insert / upsert / executemany call): what the
  store itself costs;
- script: ``benchmarks/handwritten_consumer.py``, what a competent user writes in ~50 lines, single-threaded:
  poll, Avro-decode, GET, SHA-256, safetensors header, pool, upsert 256, commit;
- consumer: the full ``Indexer`` from an empty group to "caught up and committed": Kafka reads, Avro decoding,
  object GETs (8 threads), SHA-256/size/dtype/shape checks, pooling, upserts, commits.

Script and consumer each run in a fresh process (spawned, the store client libraries imported before the clock),
into a collection of their own; each clock starts when the group hands out partitions (join time excluded) and
stops at the last commit. RSS +MB: the process's peak RSS (VmHWM, reset after the imports) minus its RSS then,
so opening the clients counts (Milvus Lite's server is a process of its own, not counted). MB/s: object bytes
read per second. The script knows it has N events to read; the consumer (``run(once=True)``) finds the end as it
hands out the record before each partition's high watermark (as its fetches report it). "(to write)" is the
consumer's rate up to its last upsert (what is left after it: the last batch's commit).

``--scaling`` (default on, off with ``--quick``): the ``vllm-mm-events consume`` CLI, one process then two in one
group, on sinks two processes can share (pgvector, LanceDB; Qdrant local mode and Milvus Lite lock their files to
one process). Each time on a new topic: once the group is stable and every process holds partitions, the data set's
records are produced again (same objects); the clock runs until the group has committed them all.

``--profile``: the consumer on the 128KB set (first sink) once more under cProfile, every thread of it (main,
writer, fetch pool), and the script likewise; prints where the time goes. ``--json PATH``: the rows as a JSON
list of dicts (the scaling rows have ``"kind": "scaling"``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))
sys.path.insert(0, str(HERE))  # handwritten_consumer; spawned children get the same sys.path

# label: (num_features, hidden, storage dtype, events, --quick events, name token)
SIZES = {
    "128KB": (64, 512, "float32", 1000, 40, "k128"),
    "4.7MB": (576, 4096, "bfloat16", 120, 6, "m47"),
}
SINKS = ("lancedb", "qdrant", "pgvector", "milvus")
CLIENT_LIBS = {"lancedb": "lancedb", "qdrant": "qdrant_client", "pgvector": "psycopg", "milvus": "pymilvus"}
SCALING_SINKS = ("pgvector", "lancedb")  # Qdrant local mode and Milvus Lite: one process per file
PARTITIONS = 4
BUCKET = "bench"
MODEL = "llava-hf/llava-1.5-7b-hf"
BATCH = 256
MB = 1e6


@dataclass
class Dataset:
    label: str
    token: str
    topic: str
    events: int
    nbytes: int  # object bytes
    dim: int
    points: list = field(repr=False, default_factory=list)
    records: list = field(repr=False, default_factory=list)  # (key, Avro value, None), as produced


# ---- data ---------------------------------------------------------------------------------------


def make_dataset(label: str, n: int, bootstrap: str, s3) -> Dataset:
    """``n`` events of one object each, stored in MinIO and produced to a topic of their own."""
    import hashlib

    import numpy as np

    from consumers.vectors import Point, point_id, point_payload, pool
    from publisher.sidecar.events import FinishedRequest, MediaItem, StoredItem, build_event, producer_info
    from schemas.codec import AvroCodec
    from schemas.objects import encode_array, object_key, read_object
    from schemas.uris import object_uri

    import consumer_run as cr

    nf, hidden, dtype, _, _, token = SIZES[label]
    topic = f"bench-{token}-{uuid.uuid4().hex[:6]}"
    cr.create_topic(bootstrap, topic, PARTITIONS)
    codec, rng = AvroCodec(), np.random.default_rng(zlib.crc32(label.encode()))
    producer = producer_info("bench", dtype)
    ds = Dataset(label, token, topic, n, 0, hidden)
    records, pending = ds.records, []
    with ThreadPoolExecutor(4) as puts:
        for i in range(n):
            f = rng.standard_normal((nf, hidden), dtype=np.float32)
            mm_hash = hashlib.sha256(f.tobytes()).hexdigest()
            obj = encode_array(f, storage_dtype=dtype, mm_hash=mm_hash, modality="image", model=MODEL)
            key = object_key(f"bench/{token}", MODEL, mm_hash, dtype)
            pending.append(puts.submit(s3.put_object, Bucket=BUCKET, Key=key, Body=obj.data))
            if len(pending) > 16:
                pending.pop(0).result()
            now = time.time()
            req = FinishedRequest(f"r{i}", f"r{i}-0000abcd", MODEL, "stop", None, 600, 30, {"tenant": "bench"},
                                  (MediaItem(mm_hash, "image", 0, 5, nf),), None, now - 0.5, now)
            uri = object_uri("s3", BUCKET, key)
            stored = {mm_hash: StoredItem(uri, obj.sha256, len(obj.data), dtype, (nf, hidden))}
            ev = build_event(req, stored, producer)
            item = ev["embeddings"][0]
            vec = pool(read_object(obj.data).to_float32(), "mean", False)  # what both readers compute
            ds.points.append(Point(point_id(ev["event_id"], 0), vec, point_payload(ev, item, "mean")))
            ds.nbytes += len(obj.data)
            records.append((ev["request_id"].encode(), codec.encode(ev), None))
        for p in pending:
            p.result()
    cr.produce(bootstrap, topic, records)
    return ds


RUN = uuid.uuid4().hex[:6]  # table names of this run: a reused PostgreSQL keeps those of earlier runs


def sink_uri(kind: str, work: Path, pg, name: str) -> str:
    name = f"{name}_{RUN}"
    return {"lancedb": f"lancedb://{work}/lance/{name}", "qdrant": f"qdrant://{work}/qdrant-{name}/{name}",
            "pgvector": pg.uri(name) if pg else "", "milvus": f"milvus://{work}/milvus-{name}.db/{name}"}[kind]


# ---- the three ways, and the profiler ----------------------------------------------------------------


def store_alone(uri: str, ds: Dataset) -> float:
    from consumers.sinks import open_vector_sink

    with open_vector_sink(uri) as sink:
        sink.ensure(ds.dim, False)
        t0 = time.perf_counter()
        for i in range(0, len(ds.points), BATCH):
            sink.upsert(ds.points[i:i + BATCH])
        rate = len(ds.points) / (time.perf_counter() - t0)
        assert sink.count() == len(ds.points)
    return rate


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rss_baseline() -> int:
    """The RSS now (kB), with the kernel's peak reset to it (so what imports left behind is not counted)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _status_kb("VmRSS")


def _peak_growth_mb(rss0: int) -> float:
    return max(0, _status_kb("VmHWM") - rss0) / 1024


def _preimport(kind: str) -> None:
    """What both ways import, before their clock and their RSS baseline."""
    for m in ("numpy", "boto3", "botocore.client", "fastavro", "confluent_kafka", "consumers.indexer",
              "consumers.objects", "consumers.sinks", f"consumers.sinks.{kind}", CLIENT_LIBS[kind],
              "publisher.stores.s3", "handwritten_consumer"):
        importlib.import_module(m)


class ThreadProfiles:
    """cProfile is per thread: one profiler per (role, thread) that runs a wrapped function, merged per role."""

    def __init__(self):
        import threading

        self.profiles: dict[tuple[str, int], object] = {}
        self.lock = threading.Lock()

    def wrap(self, fn, role: str):
        import cProfile
        import threading

        def wrapped(*a, **kw):
            with self.lock:
                prof = self.profiles.setdefault((role, threading.get_ident()), cProfile.Profile())
            prof.enable()
            try:
                return fn(*a, **kw)
            finally:
                prof.disable()
        return wrapped

    def stats(self, role: str | None = None):
        import pstats

        profs = [p for (r, _), p in self.profiles.items() if role is None or r == role]
        st = pstats.Stats(profs[0])
        for p in profs[1:]:
            st.add(p)
        return st


# (label, role, path suffix or part, function name): where the time goes, in thread-seconds of that role.
CONSUMER_PARTS = [
    ("main thread: the loop (Indexer.run)", "main", "consumers/indexer.py", "run"),
    ("  Kafka reads (KafkaSource.poll, incl. waits)", "main", "consumers/sources/kafka.py", "poll"),
    ("  Avro decoding (EventDecoder.decode)", "main", "consumers/decoder.py", "decode"),
    ("  paused, polling while the writer works", "main", "consumers/indexer.py", "_wait_paused"),
    ("  waiting for the last batch (Future.result)", "main", "concurrent/futures/_base.py", "result"),
    ("  commits (KafkaSource.commit)", "main", "consumers/sources/kafka.py", "commit"),
    ("writer thread (Indexer._write)", "writer", "consumers/indexer.py", "_write"),
    ("  waiting for the fetch pool (Future.result)", "writer", "concurrent/futures/_base.py", "result"),
    ("  upserts (sink.upsert)", "writer", "consumers/sinks/", "upsert"),
    ("  ensure collection (sink.ensure)", "writer", "consumers/sinks/base.py", "ensure"),
    ("  point payloads (point_payload)", "writer", "consumers/vectors.py", "point_payload"),
    ("fetch threads, all 8 (Indexer._vector)", "fetch", "consumers/indexer.py", "_vector"),
    ("  object GETs (ObjectFetcher.get)", "fetch", "consumers/objects.py", "get"),
    ("  verify + decode (verify_and_decode)", "fetch", "consumers/objects.py", "verify_and_decode"),
    ("    safetensors header (read_object)", "fetch", "schemas/objects.py", "read_object"),
    ("    bf16/f32 -> float32 (to_float32)", "fetch", "schemas/objects.py", "to_float32"),
    ("  SHA-256, all (objects' in verify, and SigV4 signing's in GETs)", "fetch", "~",
     "<built-in method _hashlib.openssl_sha256>"),
    ("  pooling (vectors.pool)", "fetch", "consumers/vectors.py", "pool"),
]
SCRIPT_PARTS = [
    ("script, one thread (handwritten_consumer.run)", "main", "handwritten_consumer.py", "run"),
    ("  Kafka reads (Consumer.poll, incl. group join)", "main", "~", "<method 'poll' of 'cimpl.Consumer' objects>"),
    ("  its own lines, incl. Avro decoding (fastavro's Cython reader is unseen)", "main", "handwritten_consumer.py",
     "run", "tottime"),
    ("  object GETs (fetch)", "main", "handwritten_consumer.py", "fetch"),
    ("  SHA-256, all (objects', and botocore's SigV4 signing)", "main", "~",
     "<built-in method _hashlib.openssl_sha256>"),
    ("  pooling (ndarray.mean)", "main", "~", "<method 'mean' of 'numpy.ndarray' objects>"),
    ("  point payloads (point_payload)", "main", "consumers/vectors.py", "point_payload"),
    ("  upserts + commits (flush)", "main", "handwritten_consumer.py", "flush"),
]


def summarize(profs: ThreadProfiles, parts, top: int = 15) -> str:
    """The named parts' cumulative thread-seconds, then the top functions by cumulative time."""
    def cum(role: str, path: str, name: str, which: str = "cumtime") -> tuple[int, float]:
        calls, total = 0, 0.0
        for (file, _, func), (_, nc, tt, ct, _) in profs.stats(role).stats.items():
            if func == name and (file.replace(os.sep, "/").endswith(path) if path.endswith(".py")
                                 else path in file.replace(os.sep, "/")):
                calls, total = calls + nc, total + (ct if which == "cumtime" else tt)
        return calls, total

    lines = [f"  {'part (thread-seconds)':<72} {'calls':>8} {'s':>7}"]
    for label, role, *what in parts:
        calls, total = cum(role, *what)
        lines.append(f"  {label:<72} {calls:>8,} {total:>7.2f}")
    lines.append(f"\n  top {top} functions by cumulative time (thread-seconds, all threads added):")
    lines.append(f"  {'ncalls':>9} {'tottime':>8} {'cumtime':>8}  function")
    rows = sorted(profs.stats().stats.items(), key=lambda kv: kv[1][3], reverse=True)
    root = str(HERE.parent) + os.sep
    for (file, line, func), (_, nc, tt, ct, _) in rows[:top]:
        where = func if file == "~" else f"{file.replace(root, '').split('site-packages/')[-1]}:{line}({func})"
        lines.append(f"  {nc:>9,} {tt:>8.2f} {ct:>8.2f}  {where[-110:]}")
    return "\n".join(lines)


def run_script(kind: str, bootstrap: str, topic: str, uri: str, n: int, endpoint: str, profile: bool = False) -> dict:
    """In a fresh process: the hand-written script, then a count of what it wrote."""
    _preimport(kind)
    import handwritten_consumer

    from consumers.sinks import open_vector_sink

    rss0 = _rss_baseline()
    if profile:
        profs = ThreadProfiles()
        r = profs.wrap(handwritten_consumer.run, "main")(bootstrap, topic, uri, n, endpoint)
        r["profile"] = summarize(profs, SCRIPT_PARTS, top=12)
    else:
        r = handwritten_consumer.run(bootstrap, topic, uri, n, endpoint)
    r["rss_mb"] = _peak_growth_mb(rss0)
    with open_vector_sink(uri) as sink:
        r["count"] = sink.count()
    return r


def run_consumer(kind: str, bootstrap: str, topic: str, uri: str, n: int, endpoint: str,
                 profile: bool = False) -> dict:
    """In a fresh process: the Indexer from an empty group to everything committed."""
    _preimport(kind)
    from consumers.config import ConsumerConfig
    from consumers.dead_letters import LoggedDeadLetters
    from consumers.decoder import EventDecoder
    from consumers.indexer import Indexer
    from consumers.metrics import ConsumerMetrics
    from consumers.objects import ObjectFetcher
    from consumers.sinks import open_vector_sink
    from consumers.sources.kafka import KafkaSource

    cfg = ConsumerConfig.load({"source": f"kafka://{bootstrap}/{topic}", "sinks": [uri], "metrics_port": 0,
                               "object_store": [f"s3://{BUCKET}"], "s3_endpoint_url": endpoint,
                               "s3_region": "us-east-1"}, environ={})
    rss0 = _rss_baseline()  # as for the script: its clients (Kafka, store, S3) are part of the run
    source = KafkaSource(cfg.source, f"bench-{uuid.uuid4().hex[:8]}", {})
    sink = open_vector_sink(cfg.sinks[0])
    fetcher = ObjectFetcher(cfg.object_store, cfg.s3_endpoint_url, cfg.s3_region)
    with contextlib.suppress(Exception):  # a running consumer has its S3 client already: build it before the clock
        store = fetcher._reader._store("s3", BUCKET)
        getattr(store, "_client", lambda: None)()
    idx = Indexer(cfg, source, [sink], LoggedDeadLetters(), fetcher, ConsumerMetrics(), EventDecoder())
    assigned_at = []  # the clock starts when the group hands out partitions (join time excluded)
    on_assign = source._on_assign
    source._on_assign = lambda c, p: (assigned_at.append(time.perf_counter()), on_assign(c, p))
    source.consumer.subscribe([source.topic], on_assign=source._on_assign, on_revoke=source._on_revoke,
                              on_lost=source._on_revoke)
    written_at = []  # when the last batch was in the store (the commit follows once the main thread sees it)
    write = idx._write

    def timed_write(entries, abandon):
        write(entries, abandon)
        written_at.append(time.perf_counter())
    idx._write = timed_write
    profs = None
    if profile:
        profs = ThreadProfiles()
        idx._write, idx._vector = profs.wrap(idx._write, "writer"), profs.wrap(idx._vector, "fetch")
        totals = profs.wrap(idx.run, "main")(once=True)
    else:
        totals = idx.run(once=True)
    seconds = time.perf_counter() - assigned_at[0]
    r = {"events": totals.indexed, "seconds": seconds, "written_s": written_at[-1] - assigned_at[0],
         "rss_mb": _peak_growth_mb(rss0),
         "committed": totals.committed, "dead_lettered": totals.dead_lettered,
         "batches": sum(b.get() for b in idx.metrics.batch_records._buckets), "count": sink.count()}
    if profs is not None:
        r["profile"] = summarize(profs, CONSUMER_PARTS)
    idx.close()
    source.close()
    sink.close()
    fetcher.close()
    return r


def in_fresh_process(fn, *args, **kwargs) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args, **kwargs).result()


# ---- two CLI processes in one group ------------------------------------------------------------------


def cli_run(procs: int, bootstrap: str, records: list, uri: str, endpoint: str, work: Path) -> dict:
    """``procs`` ``vllm-mm-events consume`` processes in one new group on a new, empty topic: once the group is
    stable with every process holding partitions, the data set's records are produced; the clock runs from
    then until the group has committed them all (startup and the group's join excluded)."""
    import signal

    from confluent_kafka import Consumer, ConsumerGroupState, TopicPartition
    from confluent_kafka.admin import AdminClient

    import consumer_run as cr

    topic, group = f"bench-cli-{uuid.uuid4().hex[:8]}", f"bench-cli-{uuid.uuid4().hex[:8]}"
    cr.create_topic(bootstrap, topic, PARTITIONS)
    args = [cr.CLI, "consume", "--metrics-port", "0", "--log-format", "json", "--source",
            f"kafka://{bootstrap}/{topic}", "--sink", uri, "--group", group, "--object-store", f"s3://{BUCKET}",
            "--s3-endpoint-url", endpoint, "--dlq", "none"]
    logs = [work / f"{group}-{i}.log" for i in range(procs)]
    ps = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log.open("w"), text=True) for log in logs]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    watch = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    try:
        deadline = time.monotonic() + 180
        while True:  # every process a member, holding partitions, the group stable
            for p, log in zip(ps, logs):
                if p.poll() is not None:
                    raise RuntimeError(f"consume exited {p.returncode}: {log.read_text()[-3000:]}")
            g = admin.describe_consumer_groups([group])[group].result(10)
            held = [len(m.assignment.topic_partitions) for m in g.members if m.assignment]
            if g.state == ConsumerGroupState.STABLE and len(held) == procs and all(held) and sum(held) == PARTITIONS:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group} not stable with {procs} members: {g.state} {held}")
            time.sleep(0.2)
        t0 = time.perf_counter()
        cr.produce(bootstrap, topic, records)
        while sum(max(0, tp.offset) for tp in watch.committed(tps, timeout=10)) < len(records):
            if time.monotonic() > deadline + 600:
                raise TimeoutError(f"group {group}: not everything committed")
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
    finally:
        watch.close()
        for p in ps:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in ps]
    totals = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {"seconds": seconds, "indexed": sum(t["indexed"] for t in totals),
            "dead_lettered": sum(sum(t["dead_lettered"].values()) for t in totals),
            "per_process": [t["indexed"] for t in totals], "held": held}


# ---- main ---------------------------------------------------------------------------------------------


def parse_events(spec: str | None, sizes: list[str], quick: bool) -> dict[str, int]:
    counts = {s: SIZES[s][4 if quick else 3] for s in sizes}
    for part in (spec or "").split(","):
        if part.strip():
            size, _, n = part.rpartition("=")
            for s in ([size] if size else sizes):
                counts[s] = int(n)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny data sets (40 and 6 events), no scaling runs")
    ap.add_argument("--sinks", default=",".join(SINKS))
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--events", help="N for every size, or SIZE=N,... (default 128KB=1000,4.7MB=120)")
    ap.add_argument("--profile", action="store_true", help="profile the consumer (and the script) at 128KB")
    ap.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None,
                    help="one vs two CLI consumers in a group (default: on, off with --quick)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    ap.add_argument("--bootstrap", help="use this running Kafka (host:port) instead of starting one")
    ap.add_argument("--endpoint", help="use this running S3 server (credentials: the AWS_* environment) instead "
                                       "of starting MinIO")
    ap.add_argument("--pgvector", metavar="URI", help="use this running PostgreSQL + pgvector, "
                                                      "pgvector://user@host:port/database (password: PGPASSWORD)")
    args = ap.parse_args()
    sinks, sizes = [s for s in args.sinks.split(",") if s], [s for s in args.sizes.split(",") if s]
    for s in sinks:
        if s not in SINKS:
            ap.error(f"--sinks: unknown {s!r}; expected some of {', '.join(SINKS)}")
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: unknown {s!r}; expected some of {', '.join(SIZES)}")
    counts = parse_events(args.events, sizes, args.quick)
    scaling = (not args.quick) if args.scaling is None else args.scaling

    from consumers.sinks import open_vector_sink

    import services

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="consumer-bench-"))
    kafka = services.RunningKafka(args.bootstrap) if args.bootstrap else services.KafkaBroker().start()
    minio = services.RunningS3(args.endpoint) if args.endpoint else services.MinioServer().start()
    pg = None
    if "pgvector" in sinks:
        pg = (services.RunningPostgres(args.pgvector) if args.pgvector
              else services.PostgresServer().start())
    os.environ.update(minio.env)  # the children and the CLI read the AWS_* variables
    if pg:
        os.environ.update(pg.env)
    with contextlib.suppress(Exception):  # a reused server may have it already
        minio.create_bucket(BUCKET)
    endpoint = minio.endpoint
    try:
        datasets = []
        for label in sizes:
            t0 = time.perf_counter()
            datasets.append(make_dataset(label, counts[label], kafka.bootstrap, minio.client()))
            ds = datasets[-1]
            print(f"data {label}: {ds.events} events, {ds.nbytes / MB:,.1f} MB of objects in MinIO "
                  f"({time.perf_counter() - t0:.1f}s to make)", file=sys.stderr, flush=True)
        rows, scale_rows, profiles = [], [], {}
        for ds in datasets:
            nf, hidden, dtype = SIZES[ds.label][:3]
            for kind in sinks:
                name = lambda phase: f"{ds.token}_{phase}"  # noqa: E731
                raw_rate = store_alone(sink_uri(kind, work, pg, name("raw")), ds)
                s = in_fresh_process(run_script, kind, kafka.bootstrap, ds.topic, sink_uri(kind, work, pg,
                                     name("script")), ds.events, endpoint)
                c = in_fresh_process(run_consumer, kind, kafka.bootstrap, ds.topic, sink_uri(kind, work, pg,
                                     name("cons")), ds.events, endpoint)
                assert s["count"] == ds.events and s["events"] == ds.events, s
                assert c["count"] == ds.events and c["committed"] == ds.events and not c["dead_lettered"], c
                script_rate, cons_rate = ds.events / s["seconds"], ds.events / c["seconds"]
                row = {"kind": "throughput", "sink": kind, "size": ds.label,
                       "object": f"{nf}x{hidden} {dtype}", "object_bytes": ds.nbytes // ds.events,
                       "events": ds.events, "store_alone_points_per_s": raw_rate,
                       "script_events_per_s": script_rate, "script_MB_per_s": ds.nbytes / MB / s["seconds"],
                       "consumer_events_per_s": cons_rate, "consumer_MB_per_s": ds.nbytes / MB / c["seconds"],
                       "consumer_events_per_s_to_last_write": ds.events / c["written_s"],
                       "ratio_consumer_script": cons_rate / script_rate,
                       "ratio_consumer_store_alone": cons_rate / raw_rate,
                       "consumer_rss_growth_MB": c["rss_mb"], "script_rss_growth_MB": s["rss_mb"],
                       "consumer_batch_events": c["committed"] / max(1, c["batches"])}
                rows.append(row)
                print(f"  {kind} {ds.label}: store {raw_rate:,.0f} pts/s, script {script_rate:,.1f} ev/s, "
                      f"consumer {cons_rate:,.1f} ev/s", file=sys.stderr, flush=True)
            if scaling:
                for kind in (k for k in SCALING_SINKS if k in sinks):
                    one = cli_run(1, kafka.bootstrap, ds.records, sink_uri(kind, work, pg, f"{ds.token}_cli1"),
                                  endpoint, work)
                    two = cli_run(2, kafka.bootstrap, ds.records, sink_uri(kind, work, pg, f"{ds.token}_cli2"),
                                  endpoint, work)
                    for r, n in ((one, 1), (two, 2)):
                        with open_vector_sink(sink_uri(kind, work, pg, f"{ds.token}_cli{n}")) as sink:
                            assert r["indexed"] >= ds.events and not r["dead_lettered"], r
                            assert sink.count() == ds.events, (kind, n, sink.count())
                    r1, r2 = ds.events / one["seconds"], ds.events / two["seconds"]
                    scale_rows.append({"kind": "scaling", "sink": kind, "size": ds.label, "events": ds.events,
                                       "cli_1proc_events_per_s": r1, "cli_2proc_events_per_s": r2,
                                       "speedup": r2 / r1, "split": two["per_process"],
                                       "partitions_held": two["held"]})
                    print(f"  {kind} {ds.label}: CLI x1 {r1:,.1f} ev/s, x2 {r2:,.1f} ev/s {two['per_process']}",
                          file=sys.stderr, flush=True)
        if args.profile:
            ds = next((d for d in datasets if d.label == "128KB"), None)
            if ds is None:
                print("--profile: the 128KB size is not in --sizes; nothing profiled", file=sys.stderr)
            else:
                kind = sinks[0]
                profiles["consumer"] = in_fresh_process(run_consumer, kind, kafka.bootstrap, ds.topic,
                                                        sink_uri(kind, work, pg, f"{ds.token}_pcons"), ds.events,
                                                        endpoint, profile=True)
                profiles["script"] = in_fresh_process(run_script, kind, kafka.bootstrap, ds.topic,
                                                      sink_uri(kind, work, pg, f"{ds.token}_pscript"), ds.events,
                                                      endpoint, profile=True)
                profiles["sink"], profiles["events"] = kind, ds.events
    finally:
        kafka.stop()
        minio.stop()
        if pg:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nKafka {services.KAFKA_VERSION} ({PARTITIONS} partitions), {minio.name}, {os.cpu_count()} CPUs; "
          f"objects in MinIO, one per event; rates from partition assignment to the last commit")
    hdr = (f"{'sink':<9} {'object':<6} {'events':>6} {'store pts/s':>11} {'script ev/s':>11} {'MB/s':>6} "
           f"{'consumer ev/s':>13} {'MB/s':>6} {'(to write)':>10} {'cons/script':>11} {'cons/store':>10} "
           f"{'cons RSS +MB':>12} "
           f"{'script RSS +MB':>14} {'cons batch':>10}")
    print(hdr)
    for r in rows:
        print(f"{r['sink']:<9} {r['size']:<6} {r['events']:>6} {r['store_alone_points_per_s']:>11,.0f} "
              f"{r['script_events_per_s']:>11,.1f} {r['script_MB_per_s']:>6,.0f} {r['consumer_events_per_s']:>13,.1f} "
              f"{r['consumer_MB_per_s']:>6,.0f} {r['consumer_events_per_s_to_last_write']:>10,.1f} "
              f"{r['ratio_consumer_script']:>11.2f} "
              f"{r['ratio_consumer_store_alone']:>10.3f} {r['consumer_rss_growth_MB']:>12.0f} "
              f"{r['script_rss_growth_MB']:>14.0f} {r['consumer_batch_events']:>10.0f}")
    print("(to write): the consumer's rate up to its last upsert; the last commit follows it.")
    if scale_rows:
        print("\n`vllm-mm-events consume`, one process vs two in one group: events produced once the group is "
              "stable,\nrate up to the group's last commit (startup and join excluded); split: events each indexed")
        print(f"{'sink':<9} {'object':<6} {'events':>6} {'1 proc ev/s':>11} {'2 procs ev/s':>12} {'speedup':>7} "
              f"{'split':>11}")
        for r in scale_rows:
            split = "+".join(str(x) for x in r["split"])
            print(f"{r['sink']:<9} {r['size']:<6} {r['events']:>6} {r['cli_1proc_events_per_s']:>11,.1f} "
                  f"{r['cli_2proc_events_per_s']:>12,.1f} {r['speedup']:>7.2f} {split:>11}")
    elif not args.quick:
        print("\n(no scaling runs: --no-scaling, or no pgvector/lancedb sink)")
    if profiles:
        print(f"\nprofile: the consumer, 128KB, {profiles['sink']}, {profiles['events']} events, under cProfile "
              f"({profiles['consumer']['seconds']:.2f}s profiled), every thread")
        print(profiles["consumer"]["profile"])
        print(f"\nprofile: the script, same data ({profiles['script']['seconds']:.2f}s under cProfile)")
        print(profiles["script"]["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(rows + scale_rows, indent=1))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
