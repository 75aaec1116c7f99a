"""Latency under a steady load: request finished -> event in Kafka -> point searchable in each vector store.

    .venv/bin/python benchmarks/latency.py [--quick] [--rate 10] [--seconds 40] [--profiles default,low-latency]
        [--sinks lancedb,pgvector,qdrant,milvus] [--poll-ms 15] [--json PATH]
        [--bootstrap HOST:PORT] [--pgvector pgvector://user@host:port/db] [--keep]

The load: the real engine (vLLM's ``AsyncLLM``, in a subprocess) on the tiny random-weight LLaVA built at run time
(``publisher.vllm.demo.tiny_llava``), with the publisher (``MMEmbeddingPublisher``) storing objects in a local
directory (fsync on, the durable outbox on: its defaults) and sending events to Kafka. Requests go out open-loop at
``--rate`` per second for ``--seconds`` (one asyncio task per request, each at its own due time, whatever the ones
before it are doing), each with a distinct image, so each one runs the encoder and publishes one object and one
event; 8 output tokens. A few warm-up requests first (their events also create the collections); they are not
measured. Kafka (and, for pgvector, PostgreSQL) start here unless ``--bootstrap`` and ``--pgvector`` (password:
PGPASSWORD) name running ones.

Each profile gets a new engine, a new topic (created with ``message.timestamp.type=LogAppendTime``, so the broker
stamps each record when it appends it) and, per sink, one ``vllm-mm-events consume`` process in a group of its own.
Every time is the one wall clock of this machine; each sample starts at the event's ``event_time`` (ms, "when the
request finished in the scheduler"):

  handoff     -> the event built and handed to the Kafka producer: its objects durable (``timings.publish_latency_ms``)
  in_kafka    -> the broker appended the record (its LogAppendTime)
  received    -> a plain librdkafka consumer in this process got it (assigned, no group)
  searchable  -> the point is visible in the sink: a poller thread calls the sink's ``retrieve([point ids])`` every
                 ``--poll-ms`` (15) for the points not yet seen; a point's time is the end of the call that first
                 returned it (so polling adds ~half an interval plus one call)
  kafka_to_searchable   in_kafka -> searchable: the consumer's part

LanceDB and pgvector are polled from this process, through a reader of their own (LanceDB with
``read_consistency_interval=0``: without it a reader never sees another process's writes): what another reader sees.
Qdrant local mode and Milvus Lite lock their files to one process, so for those the consume process is this script
(``--hosted``), which runs the CLI's own ``main`` with a poller thread (and a Kafka reader, for the ids) calling
``retrieve`` on the consumer's own sink object: "searchable" there means readable through the consumer's client.

Profiles: ``default`` (every setting at its default: the producer's ``linger.ms`` 5, the consumer's
``batch_linger_ms`` 200 and ``poll_timeout_s`` 1.0) and ``low-latency`` (the publisher's ``kafka`` settings
``{"linger.ms": 0}``; ``consume --batch-linger-ms 20`` and ``VLLM_MM_EVENTS_POLL_TIMEOUT_S=0.05``).

The output shows the publisher sidecars' CPU affinity as first seen: vLLM's CPU model worker pins itself (and any
child) to a core it busy-loops on between steps; this benchmark found the worker sidecar starving there under a steady
load (handoff p99 ~32 s), and the sidecar now widens its affinity to every allowed CPU at start.

Prints n, p50, p95, p99 and max (ms) per profile and stage/sink. ``--json PATH``: the rows as a list of dicts
(kind "latency", profile, stage, sink (null before the sinks), n, p50_ms, p95_ms, p99_ms, max_ms, and samples_ms:
the raw samples, for CDFs).
``--quick``: 20 requests at 5/s into LanceDB and pgvector, both profiles (~1.5 minutes with the two engine starts):
the CI smoke test. Everything shares the machine's cores (engine, sidecars, Kafka, PostgreSQL, consumers, pollers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

SINKS = ("lancedb", "pgvector", "qdrant", "milvus")
HOSTED = ("qdrant", "milvus")  # local mode: one process per file, so polled from inside the consume process
PROFILES = ("default", "low-latency")
TOKENS = {"default": "def", "low-latency": "ll"}  # profile -> table/topic name part
TAG = "LATBENCH "  # control lines on the subprocesses' stdout
STAGES = {
    "handoff": "finish -> event handed to the producer (objects durable)",
    "in_kafka": "finish -> appended by the broker (LogAppendTime)",
    "received": "finish -> received by a plain Kafka consumer here",
    "searchable": "finish -> point returned by the sink's retrieve()",
    "kafka_to_searchable": "appended by the broker -> point returned by retrieve()",
}
RUN = uuid.uuid4().hex[:6]


def profile_settings(name: str, args) -> dict:
    """What a profile changes: the publisher's extra config, the consumer's flags and environment."""
    if name == "default":
        return {"publisher_kafka": {}, "flags": [], "env": {},
                "describe": "all defaults: producer linger.ms 5; consumer batch_linger_ms 200, poll_timeout_s 1.0"}
    kafka = {"linger.ms": args.ll_producer_linger_ms}
    flags = ["--batch-linger-ms", str(args.ll_batch_linger_ms)]
    env = {"VLLM_MM_EVENTS_POLL_TIMEOUT_S": str(args.ll_poll_timeout_s)}
    return {"publisher_kafka": kafka, "flags": flags, "env": env,
            "describe": f"publisher kafka {json.dumps(kafka)}; consume {' '.join(flags)}, "
                        f"poll_timeout_s {args.ll_poll_timeout_s} (VLLM_MM_EVENTS_POLL_TIMEOUT_S)"}


# ---- the engine, in a subprocess ---------------------------------------------------------------


def emit(kind: str, **kw) -> None:
    print(TAG + json.dumps({"kind": kind, **kw}), flush=True)


def worker(spec_path: str) -> None:
    """In the subprocess: the engine; warm-up, READY, wait for GO, the paced load, DONE, wait for STOP."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    asyncio.run(drive(json.loads(Path(spec_path).read_text())))


async def drive(spec: dict) -> None:
    from vllm import SamplingParams
    from vllm.config import ECTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from publisher.vllm.demo import tiny_llava

    ec = ECTransferConfig(ec_connector="MMEmbeddingPublisher", ec_role="ec_both",
                          ec_connector_extra_config=spec["extra"])
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=spec["model"], ec_transfer_config=ec, dtype="float32", max_model_len=256, enforce_eager=True,
        limit_mm_per_prompt={"image": 1}, seed=0, disable_log_stats=True))
    loop = asyncio.get_running_loop()
    prompt = tiny_llava.prompt(1)

    async def one(i: int, phase: str, image) -> float:
        sp = SamplingParams(max_tokens=8, ignore_eos=True, extra_args={"bench_phase": phase, "bench_seq": str(i)})
        t0 = loop.time()
        async for _ in engine.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, sp,
                                       request_id=f"lat-{phase}-{i}"):
            pass
        return loop.time() - t0

    async def paced(first: int, n: int, phase: str) -> dict:
        images = [tiny_llava.random_image(spec["seed_base"] + first + k) for k in range(n)]
        tasks, late = [], []
        t0 = loop.time()
        for k in range(n):
            due = t0 + k / spec["rate"]
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            late.append(loop.time() - due)
            tasks.append(asyncio.create_task(one(first + k, phase, images[k])))
        sent = loop.time() - t0
        e2e = sorted(await asyncio.gather(*tasks))
        return {"requests": n, "send_seconds": sent, "late_ms_max": max(late) * 1000,
                "e2e_ms_p50": e2e[len(e2e) // 2] * 1000, "e2e_ms_max": e2e[-1] * 1000}

    try:
        emit("ready", **await paced(0, spec["warmup"], "warmup"))
        await loop.run_in_executor(None, sys.stdin.readline)  # GO
        emit("done", **await paced(spec["warmup"], spec["requests"], "measure"))
        await loop.run_in_executor(None, sys.stdin.readline)  # STOP (or EOF)
    finally:
        engine.shutdown()


class Engine:
    """The worker subprocess, its log, and its control lines."""

    def __init__(self, spec: dict, work: Path, name: str, tag: str):
        spec_file = work / f"engine-{name}.json"
        spec_file.write_text(json.dumps(spec))
        self.log_path = work / f"engine-{name}.log"
        self.msgs: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_file)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=dict(os.environ, LATBENCH_TAG=tag))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith(TAG):
                    self.msgs.put(json.loads(line[len(TAG):]))

    def expect(self, kind: str, timeout: float, check: Callable[[], None]) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.msgs.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the engine exited {self.proc.returncode}:\n{tail(self.log_path)}") from None
                check()
                continue
            if msg["kind"] == kind:
                return msg
        raise TimeoutError(f"the engine said no {kind!r} in {timeout:.0f}s:\n{tail(self.log_path)}")

    def send(self, word: str) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()

    def stop(self) -> None:
        self.send("STOP")
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


class Sidecars(threading.Thread):
    """Watches this engine's publisher sidecars (found by command line and an environment marker the engine passes
    on) and records their CPU affinity: a sidecar left on the core vLLM's CPU worker pinned and spins on starves."""

    def __init__(self, tag: str):
        super().__init__(daemon=True, name="latency-sidecars")
        self.marker = f"LATBENCH_TAG={tag}".encode()
        self.seen: dict[str, str] = {}  # "worker"/"scheduler" -> affinity first seen
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if not any(b"publisher.sidecar.process" in c for c in cmd):
                        continue
                    # Only a sidecar's environment is read, for the marker alone: other runs' sidecars are not ours.
                    if self.marker not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                        continue
                    role = "worker" if b"worker" in cmd else "scheduler"
                    self.seen.setdefault(role, ",".join(map(str, sorted(os.sched_getaffinity(int(pid))))))
                except OSError:  # gone, or not ours to read
                    continue

    def stop(self) -> dict:
        self.stopped.set()
        self.join(5)
        return {"affinity": dict(self.seen)}


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path}: no log)"


# ---- watching Kafka, polling sinks -----------------------------------------------------------------


@dataclass
class Seen:
    """One event, as the plain Kafka consumer saw it (times in ms since the epoch, or ms)."""

    event_id: str
    phase: str
    event_time_ms: int
    handoff_ms: float | None  # timings.publish_latency_ms
    append_ms: int | None  # the broker's LogAppendTime; None if the topic stamps CreateTime
    received_ms: float
    ids: list[str]


class Watcher(threading.Thread):
    """Reads the topic from the beginning (assigned, no group) and tells each subscriber of each event."""

    def __init__(self, bootstrap: str, topic: str, subscribers: list[Callable[[Seen], None]]):
        super().__init__(daemon=True, name="latency-watcher")
        from confluent_kafka import Consumer

        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"latency-watch-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False})
        self.topic = topic
        self.subscribers = subscribers
        self.events: dict[str, Seen] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.error: str | None = None

    def seen(self, phase: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.events.values() if s.phase == phase]

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.consumer.close()

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_LOG_APPEND_TIME, TopicPartition

        from consumers.decoder import EventDecoder
        from consumers.vectors import point_id

        decoder = EventDecoder()
        parts = self.consumer.list_topics(self.topic, timeout=15).topics[self.topic].partitions
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(parts)])
        while not self.stopped.is_set():
            first = self.consumer.poll(0.1)  # returns at the first record; then drain what is buffered
            msgs = [first, *self.consumer.consume(500, 0)] if first is not None else []
            now = time.time() * 1000
            for m in msgs:
                if m.error() is not None:
                    continue
                ev = decoder.decode(m.value())
                ts_type, ts = m.timestamp()
                timings = ev.get("timings") or {}
                s = Seen(ev["event_id"], (ev.get("metadata") or {}).get("bench_phase", "?"),
                         round(ev["event_time"].timestamp() * 1000), timings.get("publish_latency_ms"),
                         ts if ts_type == TIMESTAMP_LOG_APPEND_TIME else None, now,
                         [point_id(ev["event_id"], int(item["item_index"])) for item in ev["embeddings"]])
                with self.lock:
                    self.events[s.event_id] = s
                for sub in self.subscribers:
                    sub(s)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)


class Poller(threading.Thread):
    """Every ``interval``: ``sink.retrieve(point ids not seen yet)``; an event is visible when all its points are,
    at the end of the call that returned the last of them: ``on_visible(event_id, unix seconds)``."""

    def __init__(self, name: str, open_sink: Callable[[], object], interval: float,
                 on_visible: Callable[[str, float], None], owns_sink: bool = True):
        super().__init__(daemon=True, name=f"latency-poller-{name}")
        self.open_sink = open_sink
        self.interval = interval
        self.on_visible = on_visible
        self.owns_sink = owns_sink
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = threading.Event()
        self.calls, self.call_s, self.errors, self.last_error = 0, 0.0, 0, ""

    def offer(self, s: Seen) -> None:
        if s.ids:
            self.inbox.put(s)

    def run(self) -> None:
        pending: dict[str, str] = {}  # point id -> event id
        remaining: dict[str, set[str]] = {}  # event id -> its point ids not seen yet
        sink = None
        while not self.stopped.is_set():
            with contextlib.suppress(queue.Empty):
                while True:
                    s = self.inbox.get_nowait()
                    remaining[s.event_id] = set(s.ids)
                    pending.update((i, s.event_id) for i in s.ids)
            if not pending:
                self.stopped.wait(self.interval)
                continue
            if sink is None:
                try:
                    sink = self.open_sink()
                except Exception as e:  # noqa: BLE001 - not there yet (the consumer creates it)
                    self.errors, self.last_error = self.errors + 1, f"{type(e).__name__}: {e}"[:300]
                if sink is None:
                    self.stopped.wait(self.interval)
                    continue
            t0 = time.time()
            try:
                got = sink.retrieve(list(pending)[:1000])
            except Exception as e:  # noqa: BLE001 - e.g. the table is not created yet
                got = {}
                self.errors, self.last_error = self.errors + 1, f"{type(e).__name__}: {e}"[:300]
            t1 = time.time()
            self.calls, self.call_s = self.calls + 1, self.call_s + (t1 - t0)
            for pid in got:
                ev = pending.pop(pid, None)
                if ev is None:
                    continue
                remaining[ev].discard(pid)
                if not remaining[ev]:
                    del remaining[ev]
                    self.on_visible(ev, t1)
            self.stopped.wait(max(0.0, self.interval - (t1 - t0)))
        if sink is not None and self.owns_sink:
            with contextlib.suppress(Exception):
                sink.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)

    def stats(self) -> dict:
        return {"calls": self.calls, "call_ms_mean": self.call_s / self.calls * 1000 if self.calls else 0.0,
                "errors": self.errors, "last_error": self.last_error}


def open_reader(uri: str):
    """The sink, as a separate reader: LanceDB re-reads the table's latest version on every call."""
    from consumers.sinks import open_vector_sink

    sink = open_vector_sink(uri)
    if sink.scheme == "lancedb":
        from datetime import timedelta

        import lancedb

        from consumers.sinks.base import split_collection

        sink.db = lancedb.connect(split_collection(uri)[0], read_consistency_interval=timedelta(0))
        sink._table = None
    return sink


def hosted(spec_path: str, cli_args: list[str]) -> int:
    """``vllm-mm-events consume`` (the CLI's own ``main``) with a poller on its own sink object, in its process
    (Qdrant local mode, Milvus Lite); visibility goes to stdout as control lines."""
    import consumers.sinks
    from consumers.cli import main as cli_main

    spec = json.loads(Path(spec_path).read_text())
    captured = []
    opener = consumers.sinks.open_vector_sink

    def capture(uri: str, distance: str = "cosine"):
        sink = opener(uri, distance)
        captured.append(sink)
        return sink

    consumers.sinks.open_vector_sink = capture  # consume() imports it from the package at call time
    out = threading.Lock()

    def visible(event_id: str, t: float) -> None:
        with out:
            emit("visible", event_id=event_id, t=t)

    poller = Poller("hosted", lambda: captured[0] if captured else None, spec["interval"], visible, owns_sink=False)
    watcher = Watcher(spec["bootstrap"], spec["topic"], [poller.offer])
    watcher.start()
    poller.start()
    rc = cli_main(["consume", *cli_args])
    poller.stop()
    watcher.stop()
    with out:
        emit("poller", **poller.stats())
    return rc


class ConsumerProc:
    """One consume process for one sink; for a hosted sink, its stdout's control lines feed ``visible``."""

    def __init__(self, kind: str, uri: str, args: list[str], env: dict, work: Path, name: str,
                 visible: dict[str, float], hosted_spec: dict | None):
        import consumer_run as cr

        self.kind, self.visible = kind, visible
        self.log_path = work / f"consume-{name}-{kind}.log"
        self.poller_stats: dict = {}
        if hosted_spec is None:
            argv = [cr.CLI, "consume", *args]
        else:
            spec_file = work / f"hosted-{name}-{kind}.json"
            spec_file.write_text(json.dumps(hosted_spec))
            argv = [sys.executable, __file__, "--hosted", str(spec_file), "--", *args]
        self.proc = subprocess.Popen(argv, env=dict(os.environ, **env), stdout=subprocess.PIPE,
                                     stderr=self.log_path.open("w"), text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                msg = json.loads(line[len(TAG):])
                if msg["kind"] == "visible":
                    self.visible.setdefault(msg["event_id"], msg["t"])
                elif msg["kind"] == "poller":
                    self.poller_stats = msg

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"consume ({self.kind}) exited {self.proc.returncode}:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


# ---- one profile -------------------------------------------------------------------------------------


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """With LogAppendTime (the broker stamps records); a broker refusing that config gets a plain topic."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the futures
    try:
        admin.create_topics([NewTopic(topic, partitions, 1, config={"message.timestamp.type": "LogAppendTime"})]
                            )[topic].result(30)
    except Exception as e:  # noqa: BLE001
        print(f"  topic {topic}: LogAppendTime refused ({e}); using CreateTime", file=sys.stderr)
        admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)


def sink_uri(kind: str, work: Path, pg, tok: str) -> str:
    name = f"lat_{tok}_{RUN}"
    return {"lancedb": f"lancedb://{work}/lance/{name}", "qdrant": f"qdrant://{work}/qdrant-{tok}/{name}",
            "pgvector": pg.uri(name) if pg else "", "milvus": f"milvus://{work}/milvus-{tok}.db/{name}"}[kind]


def wait_until(pred: Callable[[], bool], timeout: float, check: Callable[[], None]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        check()
        time.sleep(0.05)
    return pred()


def run_profile(name: str, args, sinks: list[str], bootstrap: str, pg, work: Path, model: str, seed_base: int) -> dict:
    st = profile_settings(name, args)
    tok = TOKENS[name]
    topic = f"latency-{tok}-{RUN}"
    create_topic(bootstrap, topic, args.partitions)
    objects = work / "objects"
    extra = {"object_store": objects.as_uri(), "event_sink": f"kafka://{bootstrap}/{topic}",
             "spool_dir": str(work / f"spool-{tok}"), "kafka": st["publisher_kafka"], "metrics_port": 0}
    visible: dict[str, dict[str, float]] = {k: {} for k in sinks}
    interval = args.poll_ms / 1000
    pollers = {k: Poller(k, lambda k=k: open_reader(sink_uri(k, work, pg, tok)), interval,
                         lambda ev, t, k=k: visible[k].setdefault(ev, t)) for k in sinks if k not in HOSTED}
    watcher = Watcher(bootstrap, topic, [p.offer for p in pollers.values()])
    watcher.start()
    for p in pollers.values():
        p.start()
    sidecars = Sidecars(f"{RUN}-{tok}")
    sidecars.start()
    engine = Engine({"model": model, "extra": extra, "rate": args.rate, "requests": args.requests,
                     "warmup": args.warmup, "seed_base": seed_base}, work, tok, f"{RUN}-{tok}")
    env = {**(pg.env if pg else {}), **st["env"]}
    procs = []
    for k in sinks:
        cli = ["--source", f"kafka://{bootstrap}/{topic}", "--sink", sink_uri(k, work, pg, tok), "--group",
               f"latency-{tok}-{k}-{RUN}", "--metrics-port", "0", "--object-store", objects.as_uri(), "--dlq", "none",
               *st["flags"]]
        spec = {"bootstrap": bootstrap, "topic": topic, "interval": interval} if k in HOSTED else None
        procs.append(ConsumerProc(k, sink_uri(k, work, pg, tok), cli, env, work, tok, visible[k], spec))

    def check() -> None:
        for c in procs:
            c.check()
        if watcher.error:
            raise RuntimeError(f"Kafka reader: {watcher.error}")

    def all_visible(phase: str, n: int) -> bool:
        seen = [s for s in watcher.seen(phase) if s.ids]
        return len(watcher.seen(phase)) >= n and all(s.event_id in visible[k] for k in sinks for s in seen)

    out: dict = {"profile": name, "settings": st["describe"], "topic": topic}
    try:
        t0 = time.monotonic()
        out["warmup"] = engine.expect("ready", 900, check)
        if not wait_until(lambda: all_visible("warmup", args.warmup), 300, check):
            raise TimeoutError("warm-up events not searchable in every sink within 300 s: "
                               + ", ".join(f"{k} {len(visible[k])}" for k in sinks)
                               + "".join(f"\n--- consume {c.kind} ---\n{tail(c.log_path, 2000)}" for c in procs))
        out["startup_s"] = time.monotonic() - t0
        print(f"  [{name}] engine up and warm-up searchable everywhere after {out['startup_s']:.0f}s; "
              f"load: {args.requests} requests at {args.rate:g}/s", file=sys.stderr, flush=True)
        engine.send("GO")
        out["load"] = engine.expect("done", args.requests / args.rate * 3 + 120, check)
        if not wait_until(lambda: all_visible("measure", args.requests), args.drain_timeout, check):
            print(f"  [{name}] not everything searchable within {args.drain_timeout:g}s of the last response",
                  file=sys.stderr)
    finally:
        engine.stop()
        out["sidecars"] = sidecars.stop()
        for c in procs:
            c.stop()
        for p in pollers.values():
            p.stop()
        watcher.stop()
    out["events"] = watcher.seen("measure")
    out["visible"] = visible
    out["pollers"] = {k: p.stats() for k, p in pollers.items()}
    out["pollers"].update({c.kind: c.poller_stats for c in procs if c.kind in HOSTED})
    return out


# ---- results ------------------------------------------------------------------------------------------


def summarize(samples: list[float]) -> dict:
    import numpy as np

    if not samples:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(samples, dtype=float)
    p50, p95, p99 = (float(x) for x in np.percentile(a, [50, 95, 99]))
    return {"n": len(samples), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": float(a.max())}


def rows_of(res: dict, sinks: list[str], args) -> list[dict]:
    events = res["events"]
    staged = {
        ("handoff", None): [s.handoff_ms for s in events if s.handoff_ms is not None],
        ("in_kafka", None): [s.append_ms - s.event_time_ms for s in events if s.append_ms is not None],
        ("received", None): [s.received_ms - s.event_time_ms for s in events],
    }
    for k in sinks:
        vis = res["visible"][k]
        staged[("searchable", k)] = [vis[s.event_id] * 1000 - s.event_time_ms for s in events if s.event_id in vis]
        staged[("kafka_to_searchable", k)] = [vis[s.event_id] * 1000 - s.append_ms for s in events
                                              if s.event_id in vis and s.append_ms is not None]
    rows = []
    for (stage, sink), samples in staged.items():
        samples = [round(x, 3) for x in samples]
        rows.append({"kind": "latency", "profile": res["profile"], "stage": stage, "sink": sink,
                     **summarize(samples), "rate": args.rate, "requests": args.requests,
                     "settings": res["settings"], "samples_ms": samples})
    return rows


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def print_tables(results: list[dict], rows: list[dict], sinks: list[str], args) -> None:
    print("\nstages (each from the event's event_time, the request's finish in the scheduler):")
    for k, v in STAGES.items():
        print(f"  {k:<20} {v}")
    for res in results:
        load = res.get("load", {})
        print(f"\nprofile {res['profile']}: {res['settings']}")
        print(f"  load: {load.get('requests', '?')} requests sent in {load.get('send_seconds', 0):.1f}s "
              f"(target {args.rate:g}/s; latest send {load.get('late_ms_max', 0):.1f} ms behind schedule), "
              f"engine e2e p50 {load.get('e2e_ms_p50', 0):.0f} ms, max {load.get('e2e_ms_max', 0):.0f} ms; "
              f"{len(res['events'])} events seen on {res['topic']}; "
              f"{sum(1 for s in res['events'] if not s.ids)} without objects")
        sc = res.get("sidecars", {})
        print("  publisher sidecars' CPU affinity: "
              + (", ".join(f"{k} {{{v}}}" for k, v in sorted(sc.get("affinity", {}).items())) or "not seen"))
        polls = ", ".join(f"{k} {p.get('call_ms_mean', 0):.1f} ms x {p.get('calls', 0)}"
                          + (" (in the consume process)" if k in HOSTED else "") for k, p in res["pollers"].items())
        print(f"  retrieve() calls, mean duration: {polls} (every {args.poll_ms:g} ms while points are pending)")
        print(f"  {'stage':<20} {'sink':<9} {'n':>5} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}  (ms)")
        for r in rows:
            if r["profile"] == res["profile"]:
                print(f"  {r['stage']:<20} {r['sink'] or '-':<9} {r['n']:>5} {fmt(r['p50_ms']):>8} "
                      f"{fmt(r['p95_ms']):>8} {fmt(r['p99_ms']):>8} {fmt(r['max_ms']):>8}")
        want = len(res["events"])
        for k in sinks:
            got = len([s for s in res["events"] if s.event_id in res["visible"][k]])
            if got < want:
                print(f"  !! {k}: {want - got} of {want} events never seen searchable")
    print("\ntarget p99 finish -> searchable < 1000 ms:")
    for r in rows:
        if r["stage"] == "searchable":
            ok = r["p99_ms"] is not None and r["p99_ms"] < 1000
            print(f"  {r['profile']:<12} {r['sink']:<9} p99 {fmt(r['p99_ms'])} ms  {'met' if ok else 'MISSED'}")


# ---- main ----------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--hosted":
        sys.exit(hosted(sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="20 requests at 5/s, sinks lancedb,pgvector (CI smoke test)")
    ap.add_argument("--rate", type=float, help="requests per second (default 10; --quick 5)")
    ap.add_argument("--seconds", type=float, help="length of the measured load (default 40; --quick 4)")
    ap.add_argument("--warmup", type=int, help="unmeasured requests first (default 10; --quick 3)")
    ap.add_argument("--sinks", help=f"comma-separated, of {', '.join(SINKS)} (default all; --quick lancedb,pgvector)")
    ap.add_argument("--profiles", default=",".join(PROFILES), help=f"comma-separated, of {', '.join(PROFILES)}")
    ap.add_argument("--poll-ms", type=float, default=15, help="sink pollers' interval (default 15)")
    ap.add_argument("--partitions", type=int, default=3, help="partitions of each profile's topic (default 3)")
    ap.add_argument("--drain-timeout", type=float, default=60,
                    help="seconds to wait, after the last response, for every event to be searchable (default 60)")
    ap.add_argument("--ll-producer-linger-ms", type=int, default=0, help="low-latency: publisher linger.ms (0)")
    ap.add_argument("--ll-batch-linger-ms", type=int, default=20, help="low-latency: consume --batch-linger-ms (20)")
    ap.add_argument("--ll-poll-timeout-s", type=float, default=0.05, help="low-latency: consumer poll_timeout_s (0.05)")
    ap.add_argument("--json", metavar="PATH", help="write the rows (with raw samples) as a JSON list")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores) and say where")
    ap.add_argument("--model", help="the tiny LLaVA's directory (default: built under ~/.cache/vllm-mm-events)")
    ap.add_argument("--bootstrap", help="use this running Kafka (host:port) instead of starting one")
    ap.add_argument("--pgvector", metavar="URI", help="use this running PostgreSQL + pgvector, "
                                                      "pgvector://user@host:port/database (password: PGPASSWORD)")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    args.rate = args.rate or (5.0 if args.quick else 10.0)
    args.seconds = args.seconds or (4.0 if args.quick else 40.0)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    args.warmup = max(1, args.warmup)
    args.requests = max(1, round(args.rate * args.seconds))
    sinks = [s for s in (args.sinks or ("lancedb,pgvector" if args.quick else ",".join(SINKS))).split(",") if s]
    profiles = [p for p in args.profiles.split(",") if p]
    for s in sinks:
        if s not in SINKS:
            ap.error(f"--sinks: unknown {s!r}; expected some of {', '.join(SINKS)}")
    for p in profiles:
        if p not in PROFILES:
            ap.error(f"--profiles: unknown {p!r}; expected some of {', '.join(PROFILES)}")

    from publisher.vllm.demo import tiny_llava

    import services

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    model = args.model or str(tiny_llava.build(Path.home() / ".cache" / "vllm-mm-events" / "models" / "tiny-llava"))
    kafka = services.RunningKafka(args.bootstrap) if args.bootstrap else services.KafkaBroker().start()
    pg = None
    if "pgvector" in sinks:
        pg = services.RunningPostgres(args.pgvector) if args.pgvector else services.PostgresServer().start()
        os.environ.update(pg.env)  # this process's pgvector reader
    print(f"{kafka.name}; objects in a local directory ({work / 'objects'}); sinks {', '.join(sinks)}; "
          f"{args.requests} requests at {args.rate:g}/s per profile; {os.cpu_count()} CPUs",
          file=sys.stderr, flush=True)
    results, ok = [], False
    try:
        for i, name in enumerate(profiles):
            results.append(run_profile(name, args, sinks, kafka.bootstrap, pg, work, model, (i + 1) * 10**6))
        ok = True
    finally:
        kafka.stop()
        if pg:
            pg.stop()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    rows = [r for res in results for r in rows_of(res, sinks, args)]
    print_tables(results, rows, sinks, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
