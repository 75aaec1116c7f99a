"""Sidecar processes: the publisher's work runs beside vLLM's processes, never on their GIL.

Each half of the connector starts one sidecar (``python -m publisher.sidecar.process``) and
talks to it over a socketpair with typed messages (``messages.py``):

- worker sidecar: maps the worker's shared ring (its fd is inherited), serializes each
  item it is told about and stores it (``ObjectUploader``), then frees the ring region.
- scheduler sidecar: turns finished-request snapshots into events once their objects are
  durable and publishes them (``EventDispatcher`` + an ``EventSink``).
- fetch sidecar (only with ``reuse_stored_embeddings``, started by the scheduler half):
  fetches and checks stored objects that may stand in for encoder runs (``fetcher.py``).

In vLLM's processes this leaves a memcpy (or an async DMA) and one small message per item,
and one small message per finished request. The sidecar owns the slow parts: safetensors,
SHA-256, S3/filesystem I/O, Avro, Kafka. Config errors surface at engine start: the
sidecar builds its store and sink first and reports ``ready`` or the error.

If the engine process dies, the sidecar sees EOF, flushes within ``shutdown_timeout_s``
and exits. If the sidecar dies, the engine keeps serving and counts what it could not hand
over.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from publisher.sidecar.messages import (
    CLOSING_AT,
    GAUGE_BYTES,
    Close,
    Closed,
    EventsDropped,
    Failed,
    Fetch,
    FetcherInit,
    ItemsCaptured,
    Ready,
    RegionsFreed,
    RequestsFinished,
    Reused,
    SchedulerInit,
    WorkerInit,
)
from publisher.sidecar.metrics import pid_alive

log = logging.getLogger("vllm_mm_events.sidecar")


class SidecarError(RuntimeError):
    """The sidecar could not start (its store or sink failed to open): the engine fails its start."""


class Sidecar:
    """Parent side: start the sidecar, send it messages, collect its report at close."""

    def __init__(self, init: WorkerInit | SchedulerInit | FetcherInit, pass_fds: tuple[int, ...] = ()):
        role = {WorkerInit: "worker", SchedulerInit: "scheduler", FetcherInit: "fetcher"}[type(init)]
        parent, child = socket.socketpair()
        # The sidecar detaches (double fork) so that it is nobody's child: vLLM force-kills
        # its engine's process tree a few seconds into shutdown, and the sidecar must be
        # able to finish flushing (bounded by shutdown_timeout_s) even then.
        launcher = subprocess.Popen(
            # -c, not -m: with -m the working directory would lead sys.path (a planted
            # module there would run in the sidecar); the code drops the entry -c adds instead.
            [sys.executable, "-c", "import sys; sys.path.pop(0); from publisher.sidecar.process import main; "
             "sys.exit(main(sys.argv[1:]))", role, str(child.fileno())],
            pass_fds=(child.fileno(), *pass_fds), stdin=subprocess.DEVNULL)
        launcher.wait()
        child.close()
        self.conn = Connection(parent.detach())
        self._send_lock = threading.Lock()
        self.alive = True
        self.pid: int | None = None  # the sidecar's, once it reports ready
        self.conn.send(init)
        reply = self.conn.recv()
        if not isinstance(reply, Ready):
            raise SidecarError(reply.message)
        self.pid = reply.pid

    def send(self, message: Any) -> bool:
        if not self.alive:
            return False
        try:
            with self._send_lock:
                self.conn.send(message)
            return True
        except OSError as e:
            self.alive = False
            log.error("mm-events sidecar %s is gone (%s); items are no longer published", self.pid, e)
            return False

    def close(self, timeout: float) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if self.send(Close(timeout)):
            deadline = time.monotonic() + timeout + 5
            try:
                while time.monotonic() < deadline and self.conn.poll(max(0.0, deadline - time.monotonic())):
                    msg = self.conn.recv()
                    if isinstance(msg, Closed):
                        report = msg.report
                        break
            except (EOFError, OSError):
                pass
        self.conn.close()  # the sidecar exits on its own once closed (or on EOF)
        return report


# ---- the sidecar process --------------------------------------------------------------

def _arm_watchdog(timeout: float) -> None:
    """Once closing starts, the sidecar is gone within the flush budget plus a margin, whatever hangs."""
    t = threading.Timer(timeout + 10, lambda: os._exit(3))
    t.daemon = True
    t.start()


def _worker_main(conn: Connection, init: WorkerInit, engine_pid: int) -> None:
    import torch

    from publisher.config import STORED_DTYPES, PublisherConfig
    from publisher.sidecar.ring import attach_ring, ring_view
    from publisher.sidecar.uploader import ObjectUploader, UploadJob
    from publisher.stores import open_store

    c = PublisherConfig.from_dict(init.config)
    if c.storage_dtype not in STORED_DTYPES:  # keys name the dtype: only the connector can resolve native
        raise ValueError(f"storage_dtype {c.storage_dtype!r}: the connector resolves it before the sidecar starts")
    store, _ = open_store(c.object_store, endpoint_url=c.s3_endpoint_url, region=c.s3_region,
                          fsync=c.fsync, max_connections=max(10, c.upload_threads * 2))
    ring = attach_ring(init.ring_fd, init.ring_size)
    send_lock = threading.Lock()
    freed: list[int] = []  # ring offsets released by the uploader, told to the engine once per batch
    given_up: list[str] = []  # keys never stored, told with them

    def freer(offset: int):
        def free() -> None:
            with send_lock:
                freed.append(offset)
        return free

    def not_stored(key: str) -> None:
        with send_lock:
            given_up.append(key)

    def tell_freed() -> None:
        with send_lock:
            offsets, keys = tuple(freed), tuple(given_up)
            freed.clear()
            given_up.clear()
            try:
                if offsets or keys:
                    conn.send(RegionsFreed(offsets, keys))
            except OSError:
                pass  # the engine is gone; nothing to free for

    uploader = ObjectUploader(store, init.model, c.storage_dtype, threads=c.upload_threads,
                              retry_for_s=c.durability_timeout_s, metrics=_metrics(c), after_release=tell_freed,
                              not_stored=not_stored)
    conn.send(Ready(os.getpid()))

    def stopped(left: int, how: str) -> None:
        """The report the connector logs, logged here when the worker cannot: vLLM kills a worker whose
        teardown outlasts its shutdown budget, and the connector's own report dies with it."""
        saves, loads, dropped = totals
        log.info("mm-events worker sidecar stopped%s: saves=%d loads=%d %s, dropped=%d", how, saves, loads,
                 dict(uploader.stats.as_dict(), not_uploaded=left), dropped)

    timeout = c.shutdown_timeout_s
    totals = (0, 0, 0)  # the worker's saves, loads and drops, as last told
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            _arm_watchdog(timeout)
            stopped(uploader.close(timeout), " after its engine")  # the engine died: store what we have, bounded
            return
        if isinstance(msg, ItemsCaptured):
            totals = tuple(map(max, totals, msg.totals))  # running totals; two threads send them
            for it in msg.items:
                host = ring_view(ring, it.offset, getattr(torch, it.dtype), it.shape)
                uploader.submit(UploadJob(it.key, host, freer(it.offset), it.mm_hash, it.modality, it.source,
                                          it.extras, it.input_digest))
        elif isinstance(msg, Close):
            _arm_watchdog(msg.timeout)
            left = uploader.close(msg.timeout)
            try:
                with send_lock:
                    conn.send(Closed(dict(uploader.stats.as_dict(), not_uploaded=left)))
            except OSError:  # the engine stopped waiting for the report
                stopped(left, "")
            return


def _metrics(c, serve: bool = False):
    """This sidecar's metrics when ``metrics_port`` is set; the scheduler sidecar also serves them."""
    if not c.metrics_port:
        return None
    from publisher.sidecar import metrics

    d = metrics.enable_multiprocess(c.metrics_port)
    if serve:
        metrics.forget_dead_processes(d)
        metrics.serve(c.metrics_port, c.metrics_host)
    return metrics.PublisherMetrics()


PARKED = 64  # requests read past the in-flight cap and held back, so control messages get through


def _scheduler_main(conn: Connection, init: SchedulerInit, engine_pid: int) -> None:
    from publisher.config import PublisherConfig
    from publisher.event_sinks import open_event_sink
    from publisher.sidecar.dispatcher import EventDispatcher
    from publisher.sidecar.outbox import Outbox
    from publisher.sidecar.stop_strings import StopStringResolver
    from publisher.stores import open_store
    from schemas.codec import AvroCodec

    c = PublisherConfig.from_dict(init.config)
    try:
        store, _ = open_store(c.object_store, endpoint_url=c.s3_endpoint_url, region=c.s3_region, fsync=c.fsync)
        sink = open_event_sink(c.event_sink, AvroCodec(), kafka=c.kafka, registry_url=c.schema_registry_url,
                               registry_settings=c.schema_registry, fsync=c.fsync,
                               topic_partitions=c.topic_partitions)
    except Exception as e:  # noqa: BLE001 - reported to the engine, which fails its start
        conn.send(Failed(f"mm-events: cannot open the store or event sink: {type(e).__name__}: {e}"))
        return
    # The engine reads how many events have settled from this shared word, to apply the
    # drop policy without waiting on us.
    settled = mmap.mmap(init.gauge_fd, GAUGE_BYTES)
    outbox = Outbox(c.spool_dir, c.event_sink, c.max_spool_bytes, fsync=c.fsync) if c.spool_dir else None
    metrics = _metrics(c, serve=True)
    dispatcher = EventDispatcher(store, sink, init.producer, durability_timeout_s=c.durability_timeout_s,
                                 on_settled=lambda n: struct.pack_into("<Q", settled, 0, n), outbox=outbox,
                                 metrics=metrics, on_spooled=lambda n: struct.pack_into("<Q", settled, 8, n))
    stop_strings = StopStringResolver(init.tokenizer_json)
    for req, keys in outbox.take_replay() if outbox else ():
        dispatcher.offer(req, keys, replayed=True)  # what an earlier run left unacknowledged
    conn.send(Ready(os.getpid()))
    # One loop, one thread: read what the engine sent, pump, repeat. When max_pending_events
    # are in flight it stops reading, the socket fills, and the engine's send blocks: the
    # "block" policy, applied by the kernel.
    # At the cap it still reads a little (up to PARKED requests, held back), so a Close or a
    # drop count behind them is seen even while the sink is away for good. A parked request is
    # spooled at once where the spool has room: durable_before_return holds its response until
    # then, and the sink may be away for long.
    parked: list[tuple] = []  # (FinishedRequest, keys, spooled)

    def park(req, keys) -> None:
        spooled = outbox is not None and not outbox.full()
        if spooled:
            dispatcher.spool(req, keys)
        parked.append((req, keys, spooled))

    def offer_parked(room: Callable[[], bool] = lambda: True) -> None:
        """Offer parked requests, in order, while there is room."""
        while parked and room():
            req, keys, spooled = parked.pop(0)
            dispatcher.offer(req, keys, spooled=spooled)

    def full() -> bool:
        return dispatcher.in_flight >= c.max_pending_events or (outbox is not None and outbox.full())

    def held_back() -> bool:
        """Whether to stop reading. Not once the engine is closing: its Close is behind what it sent, and
        what it sent was answered; it is read (parked, spooled where there is room) until the Close."""
        return full() and len(parked) >= PARKED and not settled[CLOSING_AT]

    def take(msg) -> None:
        if isinstance(msg, RequestsFinished):
            for req, keys, stop_check in msg.requests:  # past the cap: parked
                req = stop_strings.resolve(req, stop_check)  # before it is spooled: what the client got
                if full() or parked:
                    park(req, keys)
                else:
                    dispatcher.offer(req, keys)
        elif isinstance(msg, EventsDropped):
            dispatcher.stats.inc("dropped", msg.count)

    while True:
        wait = dispatcher.pump()
        offer_parked(lambda: not full())
        try:
            if held_back():
                if not pid_alive(engine_pid):
                    raise EOFError("the engine is gone")
                time.sleep(min(wait, 0.01))
                continue
            if not conn.poll(min(wait, 0.01) if full() else wait):
                continue
            while True:
                msg = conn.recv()
                if isinstance(msg, Close):
                    _arm_watchdog(msg.timeout)
                    offer_parked()  # spooled, so not lost when the flush cannot send them
                    left = dispatcher.close(msg.timeout)
                    report = dict(dispatcher.stats.as_dict(), undelivered=left)
                    try:
                        conn.send(Closed(report))
                    except OSError:  # the engine stopped waiting for the report
                        log.info("mm-events scheduler sidecar stopped: %s", report)
                    return
                take(msg)
                if not conn.poll(0) or held_back():
                    break
        except (EOFError, OSError):
            # The engine died. What it sent before is still in the socket (read no further at the cap), and
            # those requests were answered: read it all (the socket's buffer bounds it) and spool it.
            try:
                while conn.poll(0):
                    take(conn.recv())
            except (EOFError, OSError):
                pass
            offer_parked()
            _arm_watchdog(c.shutdown_timeout_s)
            left = dispatcher.close(c.shutdown_timeout_s)  # the engine died: publish what we can, bounded
            log.info("mm-events scheduler sidecar stopped after its engine: %s",
                     dict(dispatcher.stats.as_dict(), undelivered=left))
            return


def _fetcher_main(conn: Connection, init: FetcherInit, engine_pid: int) -> None:
    from publisher.config import PublisherConfig
    from publisher.sidecar.fetcher import StoredEmbeddingFetcher
    from publisher.stores import open_store

    c = PublisherConfig.from_dict(init.config)
    store, _ = open_store(c.object_store, endpoint_url=c.s3_endpoint_url, region=c.s3_region, fsync=False)
    send_lock = threading.Lock()

    def reply(msg) -> None:
        with send_lock:
            try:
                conn.send(msg)
            except OSError:
                pass  # the engine is gone

    try:
        store.head(".vllm-mm-events-warmup")  # open the connection now, not on the first request's lookup
    except Exception as e:  # noqa: BLE001 - lookups report the store's state as they come
        log.info("mm-events fetch sidecar: the object store did not answer yet: %s", e)
    fetcher = StoredEmbeddingFetcher(store, Path(init.ring), init.ring_size, model=init.model,
                                     model_dtype=init.model_dtype, storage_dtype=init.storage_dtype,
                                     hidden_size=init.hidden_size, reply=reply, metrics=_metrics(c))
    conn.send(Ready(os.getpid()))
    try:
        while True:
            msg = conn.recv()
            if isinstance(msg, Fetch):
                fetcher.submit(msg)
            elif isinstance(msg, Reused):
                fetcher.stats.inc("reused", msg.count)
            elif isinstance(msg, Close):
                _arm_watchdog(msg.timeout)
                fetcher.close()
                reply(Closed(fetcher.stats.as_dict()))
                return
    except (EOFError, OSError):
        fetcher.close()  # the engine is gone: nobody will load what is fetched
        # The connector logs this report at its shutdown; vLLM may have killed it before that ran.
        log.info("mm-events reuse (the fetch sidecar's report; its engine stopped first): %s",
                 fetcher.stats.as_dict())


def _yield_to_the_engine(role: str) -> None:
    """Run as a batch task (SCHED_BATCH): the same share of the CPU, but waking up never preempts
    a running task. The engine wakes a sidecar once per step (its message); on a core the two
    share, a normal task woken that way often takes the CPU from vLLM's scheduler loop or model
    step at once, in the middle of the hook that sent the message. A batch task waits for the
    engine's slice to end (milliseconds at most), which the sidecars' batching absorbs. Where the
    sidecars have cores of their own (``sidecar_cpus``) nothing changes."""
    try:
        if os.sched_getscheduler(0) == os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as e:  # not Linux, or a policy this process may not leave
        log.debug("mm-events %s sidecar: scheduling policy left as is (%s)", role, e)


def _place_on_cpus(role: str, cpu_list: str | None) -> None:
    """Run on ``sidecar_cpus``, or else undo a CPU pinning inherited from the engine process.

    vLLM's CPU worker binds itself to its cores (``VLLM_CPU_OMP_THREADS_BIND``) and, between steps,
    spins on them (``sched_yield``) waiting for work; a child inherits the binding. The worker
    sidecar, started from that worker, then shared one busy core with it and got no CPU time under a
    steady load: objects were stored 12-30 s late, and some events went out with ``missing_embeddings``
    after ``durability_timeout_s`` (benchmarks/latency.py). Without ``sidecar_cpus`` the sidecar may run
    on every CPU this process is allowed (the kernel intersects the mask with the pod's cpuset)."""
    from publisher.settings import parse_cpu_list

    try:
        before = os.sched_getaffinity(0)
    except (AttributeError, OSError) as e:  # not Linux: keep what we have
        log.debug("mm-events %s sidecar: CPU affinity left as is (%s)", role, e)
        return
    wanted = parse_cpu_list(cpu_list) if cpu_list else None
    try:
        os.sched_setaffinity(0, wanted if wanted else range(os.cpu_count() or 1))
    except OSError as e:
        if wanted is None:
            log.debug("mm-events %s sidecar: CPU affinity left as is (%s)", role, e)
            return
        # None of the listed CPUs is in the pod's cpuset: say so, and do not starve (see above).
        log.warning("mm-events %s sidecar: sidecar_cpus %s cannot be used here (%s); running on every allowed CPU",
                    role, cpu_list, e.strerror or e)
        return _place_on_cpus(role, None)
    after = os.sched_getaffinity(0)
    if after != before or wanted:
        log.info("mm-events %s sidecar: CPU affinity %s inherited from the engine; now %s", role,
                 _cpus(before), _cpus(after))


def _cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def main(argv: list[str]) -> int:
    # One core's worth of threads at most: the engine owns the machine's cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    from publisher.logs import setup_logging

    setup_logging()
    role, fd = argv[0], int(argv[1])
    engine_pid = os.getppid()  # the launcher's parent; the sidecar outlives the launcher
    if os.fork() > 0:  # detach: the launcher exits, the sidecar is reparented away from vLLM
        os._exit(0)
    os.setsid()
    _yield_to_the_engine(role)  # before any thread starts: they inherit it
    conn = Connection(fd)
    init = conn.recv()
    _place_on_cpus(role, init.config.get("sidecar_cpus"))
    try:
        {"worker": _worker_main, "scheduler": _scheduler_main, "fetcher": _fetcher_main}[role](conn, init, engine_pid)
    except Exception as e:  # noqa: BLE001 - tell the engine, then die loudly
        log.exception("mm-events %s sidecar failed", role)
        try:
            conn.send(Failed(f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        return 1
    if role == "worker":
        # Its work is flushed (the uploader drained or gave up within the budget). Skip the
        # interpreter's teardown: after a dtype conversion, torch's C++ static destructors abort
        # the process at exit ("terminate called without an active exception", a core dump).
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
