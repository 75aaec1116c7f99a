"""The consume loop: events in, points out, source positions committed after the sinks.

Two stages. The main thread polls the source and builds a batch (closed by count, bytes or
linger time). One writer thread takes a closed batch: fetches and verifies the objects
(in parallel), pools, dead-letters poison, upserts into every sink, and only then does the
main thread commit the batch's positions. While the writer is busy and the next batch is
full, the source is paused but still polled (group membership stays alive), so memory is
bounded by two batches. Upserts are idempotent by point id, so anything replayed after a
crash between write and commit rewrites the same points: at least once, no duplicates.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout  # not the built-in one before Python 3.11
from dataclasses import dataclass, field
from typing import Any, Callable

from consumers.config import ConsumerConfig
from consumers.dead_letters import DeadLetters
from consumers.decoder import EventDecoder
from consumers.errors import (
    BadObject,
    DimensionMismatchPoison,
    PermanentErrorPoison,
    Poison,
    SinkRejected,
    Transient,
    Undecodable,
)
from consumers.metrics import ConsumerMetrics
from consumers.objects import ObjectFetcher, verify_and_decode
from consumers.progress import Progress
from consumers.sinks.base import DimensionMismatch, SinkConfigError, VectorSink
from consumers.sources.base import EventSource, SourceRecord
from consumers.vectors import Point, point_id, point_payload, pool

log = logging.getLogger("vllm_mm_events.consumer")

INFLIGHT_POLL_S = 0.02  # the poll's slice while a batch is being written
# How long a rebalance waits for the batch being written (whose writer, told to give up, ends the call
# under way): longer than any sink's own limit on one call (pgvector's is 120 s), shorter than
# max.poll.interval.ms (300 s by default), past which the group would drop this consumer.
REVOKE_WAIT_S = 150.0
# Fault injection for the crash/replay test: exit hard after the Nth batch is written to the
# sinks and before its positions are committed.
CRASH_AFTER_WRITE_ENV = "VLLM_MM_EVENTS_CONSUMER_CRASH_AFTER_WRITE"


class Abandoned(Exception):
    """A batch given up while it was retrying: shutdown ran out of time, or its partitions were being
    revoked. It is not committed."""


@dataclass
class Entry:
    record: SourceRecord
    event: dict | None = None
    poison: Poison | None = None
    nbytes: int = 0
    fetches: list[Future] | None = None  # its items' vectors, started when its batch closed


@dataclass
class Inflight:
    future: Future
    entries: list[Entry]
    started: float
    abandon: threading.Event  # set: the writer gives the batch up at its next retry (Abandoned)


@dataclass
class Totals:
    consumed: int = 0
    indexed: int = 0
    committed: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "indexed": self.indexed, "committed": self.committed,
                "dead_lettered": dict(self.dead_lettered)}


class Indexer:
    def __init__(self, cfg: ConsumerConfig, source: EventSource, sinks: list[VectorSink], dead_letters: DeadLetters,
                 fetcher: ObjectFetcher, metrics: ConsumerMetrics, decoder: EventDecoder,
                 progress: Progress | None = None):
        self.cfg = cfg
        self.progress = progress or Progress(cfg.progress_interval_s)
        self.source = source
        self.sinks = sinks
        self.dead_letters = dead_letters
        self.fetcher = fetcher
        self.metrics = metrics
        self.decoder = decoder
        self.totals = Totals()
        self._stop = threading.Event()
        self._abandon_at: float | None = None
        self._fetch_pool = ThreadPoolExecutor(cfg.fetch_threads, thread_name_prefix="mm-events-fetch")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mm-events-writer")
        self._batch: list[Entry] = []  # open: polled, filling
        self._closed: list[Entry] = []  # closed, objects prefetching, waiting for the writer
        self._batch_bytes = 0
        self._batch_started = 0.0
        self._inflight: Inflight | None = None
        self._batches_written = 0
        self._crash_after = int(os.environ.get(CRASH_AFTER_WRITE_ENV, "0") or 0)
        self._sinks_ready = False
        source.before_revoke = self._before_revoke
        if cfg.pooling == "none":
            for s in sinks:
                if not s.supports_multivector:
                    raise SinkConfigError(f"{s.scheme}:// cannot store multi-vectors (pooling=none); use --pooling "
                                          "mean, first or max, or a qdrant:// or lancedb:// sink")

    # ---- control -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: stop polling; the batch in flight gets ``shutdown_timeout_s`` to finish."""
        if not self._stop.is_set():
            log.info("stop requested: finishing the batch in flight (up to %.0fs), then committing",
                     self.cfg.shutdown_timeout_s)
            self._abandon_at = time.monotonic() + self.cfg.shutdown_timeout_s
            self._stop.set()

    def run(self, once: bool = False) -> Totals:
        cfg = self.cfg
        self.progress.start(once)
        try:
            while not self._stop.is_set():
                self.metrics.beat()
                self._reap()
                caught_up = once and self.source.caught_up()
                if self._batch and (self._batch_closed() or (once and caught_up)):
                    self._dispatch()
                    continue
                if once and caught_up and not self._batch and self._inflight is None:
                    break
                linger_left = ((self._batch_started + cfg.batch_linger_ms / 1000 - time.monotonic()) if self._batch
                               else 1e9)
                # A batch being written: poll in short slices, so its commit follows its write by
                # milliseconds rather than a whole idle poll.
                timeout = INFLIGHT_POLL_S if self._inflight is not None else cfg.poll_timeout_s
                self._add(self.source.poll(cfg.batch_max_records - len(self._batch),
                                           max(0.0, min(timeout, linger_left))))
                self.progress.tick(self.totals, self._lag)
            self._finish_inflight(wait=True)
        finally:
            self.progress.finish(self.totals, self._lag)
        if self._batch:
            log.info("shutdown: %d polled events not written; they are not committed and will be read again",
                     len(self._batch))
            self._batch = []
        return self.totals

    def _lag(self) -> int | None:
        lag = self.source.lag()
        if lag is not None:
            self.metrics.lag.set(lag)
        return lag

    def close(self) -> None:
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- main thread -----------------------------------------------------------------------

    def _add(self, records: list[SourceRecord]) -> None:
        for r in records:
            if not self._batch:
                self._batch_started = time.monotonic()
            e = self._entry(r)
            self._batch.append(e)
            self._batch_bytes += e.nbytes
            self.totals.consumed += 1
            self.metrics.consumed.inc()

    def _entry(self, r: SourceRecord) -> Entry:
        e = Entry(r)
        try:
            if r.error:
                raise Undecodable(r.error)
            e.event = r.event if r.event is not None else self.decoder.decode(r.value)
            e.nbytes = sum(int(i["size_bytes"]) for i in e.event["embeddings"])
        except Poison as p:
            e.poison = p
        except Transient as t:  # the registry is away: keep the record, decode it in the writer
            self.metrics.errors.labels(t.kind).inc()
        return e

    def _batch_closed(self) -> bool:
        cfg = self.cfg
        return (len(self._batch) >= cfg.batch_max_records or self._batch_bytes >= cfg.batch_max_bytes
                or time.monotonic() - self._batch_started >= cfg.batch_linger_ms / 1000)

    def _dispatch(self) -> None:
        if self._stop.is_set() or not self._batch:
            return
        self._closed, started = self._split_at_byte_cap()
        abandon = threading.Event()
        # Its objects are fetched while the writer finishes the batch before it: with batches cut at
        # batch_max_bytes (a dozen 4.7 MB objects), fetching only once the writer is free left the fetch
        # threads idle through every upsert and commit.
        self._prefetch(self._closed, abandon)
        if self._inflight is not None:
            self._wait_paused()  # a rebalance meanwhile may drop entries of self._closed, or put some back
        entries, self._closed = self._closed, []
        if self._stop.is_set():
            self._batch = entries + self._batch  # not written, not committed: read again after a restart
            self._batch_bytes += sum(e.nbytes for e in entries)
            return
        if not entries:
            return
        self._inflight = Inflight(self._writer.submit(self._write, entries, abandon), entries, started, abandon)
        if self.metrics.work_since is None:
            self.metrics.work_since = time.monotonic()

    def _split_at_byte_cap(self) -> tuple[list[Entry], float]:
        """Take the open batch up to ``batch_max_bytes`` (at least one event); the rest, polled in the same
        call, stays open as the next batch (as old as this one: it goes out next), so a batch's objects stay
        within the cap, one larger event going alone. Order is kept: the rest is written and committed
        after this."""
        cap, total, cut = self.cfg.batch_max_bytes, 0, len(self._batch)
        for i, e in enumerate(self._batch):
            total += e.nbytes
            if total > cap and i > 0:
                cut = i
                break
        entries, started = self._batch[:cut], self._batch_started
        self._batch = self._batch[cut:]
        self._batch_bytes = sum(e.nbytes for e in self._batch)
        return entries, started

    def _prefetch(self, entries: list[Entry], abandon: threading.Event) -> None:
        for e in entries:
            if e.event is not None and e.poison is None:
                e.fetches = [self._fetch_pool.submit(self._vector, item, abandon) for item in e.event["embeddings"]]

    def _wait_paused(self) -> None:
        """A slow sink: pause the partitions and keep polling (heartbeats, rebalances) until the writer is free."""
        self.source.pause()
        try:
            while self._inflight is not None and not self._inflight.future.done():
                self.metrics.beat()
                self._add(self.source.poll(max(1, self.cfg.batch_max_records), 0))  # may revoke: _before_revoke
                self.progress.tick(self.totals, self._lag)
                if self._stop.is_set() or self._inflight is None:  # a rebalance gave the batch up
                    break
                wait([self._inflight.future], timeout=0.1)  # back as soon as the writer is done
        finally:
            self.source.resume()
        self._reap()

    def _reap(self) -> None:
        if self._inflight is not None and self._inflight.future.done():
            self._finish_inflight(wait=False)

    def _finish_inflight(self, wait: bool, timeout: float | None = None, why: str = "shutdown") -> bool:
        """Commit the batch in flight once written (``wait``: for up to ``timeout``, or the shutdown's time
        left). False when it was given up or did not finish: then nothing of it is committed."""
        inflight = self._inflight
        if inflight is None:
            return True
        try:
            if wait:
                if timeout is None and self._abandon_at is not None:
                    timeout = max(1.0, self._abandon_at - time.monotonic() + 5)
                inflight.future.result(timeout=timeout)
            else:
                inflight.future.result()
        except Abandoned as a:
            log.warning("%s: gave up a batch of %d events still retrying (%s); not committed",
                        why, len(inflight.entries), a)
            self._inflight = None
            return False
        except (TimeoutError, FutureTimeout):
            log.warning("%s: a batch of %d events did not finish in time; not committed", why, len(inflight.entries))
            self._inflight = None
            return False
        self._inflight = None
        records = [e.record for e in inflight.entries]
        self.source.commit(records)
        self.metrics.work_since = time.monotonic() if self._batch else None
        self.totals.committed += len(records)
        self.metrics.batch_seconds.observe(time.monotonic() - inflight.started)
        self.metrics.batch_records.observe(len(records))
        self.metrics.last_commit.set_to_current_time()
        return True

    def _before_revoke(self, gone: set) -> None:
        """Partitions are moving to another consumer. The batch being written is finished and committed
        first, but one whose writer is retrying (a sink or the object store down) is given up at once: the
        whole group's rebalance waits for this callback, and would wait as long as the outage lasts. Its
        events of the partitions we keep go back to the head of the queue, to be written again in order;
        those of the revoked ones, like everything polled of them and not written, are their new owner's."""
        inflight, redo = self._inflight, []
        if inflight is not None:
            inflight.abandon.set()  # the call under way ends (each client has its limit); no retry starts
            deadline = time.monotonic() + REVOKE_WAIT_S
            while not inflight.future.done() and time.monotonic() < deadline:
                self.metrics.beat()  # the loop is here, waiting a bounded time: alive (/healthz)
                wait([inflight.future], timeout=1.0)
            if not self._finish_inflight(wait=True, timeout=0, why="rebalance"):
                redo = inflight.entries

        def ours(e: Entry) -> bool:
            return self.source.owns(e.record) and e.record.position[0] not in gone
        redo_kept = [e for e in redo if ours(e)]
        kept, closed = [e for e in self._batch if ours(e)], [e for e in self._closed if ours(e)]
        dropped = len(redo) + len(self._batch) + len(self._closed) - len(redo_kept) - len(kept) - len(closed)
        if dropped:
            log.info("rebalance: dropping %d unwritten events of revoked partitions (their new owner reads them)",
                     dropped)
        for e in redo + [e for e in self._closed if not ours(e)]:
            for f in e.fetches or ():
                f.cancel()  # not started yet: no GET for an event given up or gone
        fresh = [self._entry(e.record) for e in redo_kept]  # nothing of the given-up attempt carries over
        if fresh:
            log.info("rebalance: %d events of partitions still ours go out again first", len(fresh))
        if closed:  # called from _dispatch, whose closed batch goes out next: these go before it
            self._closed, self._batch = fresh + closed, kept
        else:
            self._closed, self._batch = [], fresh + kept
            if fresh:
                self._batch_started = inflight.started
        self._batch_bytes = sum(e.nbytes for e in self._batch)
        if self._inflight is None and not self._batch and not self._closed:
            self.metrics.work_since = None  # nothing left in hand: idle, not stalled

    # ---- writer thread ---------------------------------------------------------------------

    def _retry(self, kind: str, fn: Callable[[], Any], abandon: threading.Event) -> Any:
        """Run ``fn`` until it passes, backing off on ``Transient``; one that says ``permanent_after``
        becomes ``PermanentErrorPoison`` after that many retries. ``Abandoned`` instead of a retry once
        the batch's ``abandon`` is set, or when shutdown's time would run out."""
        delay, attempt = 0.2, 0
        while True:
            self.metrics.trying()  # a writer that keeps trying is alive (/healthz), however long the outage
            try:
                return fn()
            except Transient as t:
                self.metrics.errors.labels(t.kind or kind).inc()
                if t.permanent_after is not None and attempt >= t.permanent_after:
                    raise PermanentErrorPoison(f"{t} (still failing after {attempt} retries)") from None
                if abandon.is_set() or (self._abandon_at is not None and time.monotonic() + delay > self._abandon_at):
                    raise Abandoned(str(t)) from None
                log.warning("%s (retrying in %.1fs)", t, delay)
                pause = delay * (0.5 + random.random())
                self.metrics.trying(pause)  # a try is due: alive through a backoff of any length
                if abandon.wait(pause):
                    raise Abandoned(str(t)) from None
                delay = min(delay * 2, 30.0)
                attempt += 1

    def _write(self, entries: list[Entry], abandon: threading.Event) -> None:
        cfg = self.cfg
        for e in entries:  # values left undecoded while the registry was away
            if e.event is None and e.poison is None:
                try:
                    e.event = self._retry("source", lambda e=e: self.decoder.decode(e.record.value), abandon)
                except Poison as p:
                    e.poison = p
        fetches = {}
        for ei, e in enumerate(entries):
            if e.event is not None:
                self.metrics.missing.inc(len(e.event.get("missing_embeddings") or ()))
                for j, item in enumerate(e.event["embeddings"]):
                    fetches[(ei, j)] = (e.fetches[j] if e.fetches is not None
                                        else self._fetch_pool.submit(self._vector, item, abandon))
        points: dict[int, list[Point]] = {}  # entry index -> its points
        for ei, e in enumerate(entries):
            if e.event is None:
                continue
            try:
                indexes = [int(item["item_index"]) for item in e.event["embeddings"]]
                if len(set(indexes)) != len(indexes):
                    raise BadObject(f"event {e.event['event_id']}: item_index repeats ({indexes})")
                mine = []
                for j, item in enumerate(e.event["embeddings"]):
                    vec = fetches[(ei, j)].result()  # raises the item's Poison
                    self._ensure_sinks(vec, abandon)
                    for s in self.sinks:
                        s.check_dimension(vec)
                    mine.append(Point(point_id(e.event["event_id"], item["item_index"]), vec,
                                      point_payload(e.event, item, cfg.pooling)))
                points[ei] = mine
            except Poison as p:
                e.poison = p
            except DimensionMismatch as d:
                e.poison = DimensionMismatchPoison(str(d))
        for s in self.sinks:  # a store refusing an event's data dead-letters that event, not the batch
            for ei, message in self._upsert_isolating(s, points, abandon).items():
                entries[ei].poison = SinkRejected(f"{s.name}: {message}")
                del points[ei]
        written = sum(len(p) for p in points.values())
        poison = [e for e in entries if e.poison is not None]
        for e in poison:
            r = e.record
            value = r.value or (self.decoder.encode(e.event) if e.event is not None else b"")
            self.dead_letters.send(value, r.key, r.headers, e.poison.kind, str(e.poison), r.coords)
            log.warning("dead-lettered %s: %s (%s)", e.poison.kind, e.poison, r.coords)
        if poison:
            self._retry("dlq", self.dead_letters.flush, abandon)
            for e in poison:
                self.totals.dead_lettered[e.poison.kind] = self.totals.dead_lettered.get(e.poison.kind, 0) + 1
                self.metrics.dead_lettered.labels(e.poison.kind).inc()
        for s in self.sinks:
            self.metrics.indexed.labels(s.name).inc(written)
        self.totals.indexed += written
        self._batches_written += 1
        if self._crash_after and self._batches_written >= self._crash_after:
            log.error("fault injection: exiting after writing batch %d, before its commit", self._batches_written)
            logging.shutdown()
            os._exit(86)

    def _upsert_isolating(self, sink: VectorSink, points: dict[int, list[Point]],
                          abandon: threading.Event) -> dict[int, str]:
        """Upsert every entry's points; connection trouble is retried (``Transient``). An error about
        the data splits the batch until the entries the store refuses are found: returns
        {entry index: the store's message} for those, having written every other entry."""
        rejected: dict[int, str] = {}

        def write(group: list[int]) -> None:
            chunk = [p for ei in group for p in points[ei]]
            if not chunk:
                return
            try:
                self._retry("sink", lambda: sink.upsert(chunk), abandon)
            except (Abandoned, Poison):
                raise
            except Exception as e:  # noqa: BLE001 - the store refused the data: isolate it
                if len(group) == 1:
                    rejected[group[0]] = f"{type(e).__name__}: {str(e).strip()[:1000]}"
                    log.warning("sink %s refused event %s: %s", sink.name, group[0], rejected[group[0]])
                    return
                write(group[:len(group) // 2])
                write(group[len(group) // 2:])

        order = list(points)
        for i in range(0, len(order), 256):  # bounded request size
            write(order[i:i + 256])
        return rejected

    def _vector(self, item: dict, abandon: threading.Event):
        """Fetch, verify and pool one item: on the fetch pool, so hashing and numpy run in parallel."""
        self.fetcher.check(item)  # a forbidden or oversized object is refused before any I/O
        data = self._retry("object_store", lambda: self.fetcher.get(item["uri"]), abandon)
        return pool(verify_and_decode(item, data), self.cfg.pooling, self.cfg.normalize)

    def _ensure_sinks(self, vec, abandon: threading.Event) -> None:
        if self._sinks_ready:
            return
        for s in self.sinks:
            try:
                dim = self._retry("sink", lambda s=s: s.ensure(int(vec.shape[-1]), vec.ndim == 2), abandon)
            except (Abandoned, Poison, SinkConfigError):
                raise
            except Exception as e:  # noqa: BLE001 - the store refused a collection of this shape
                raise SinkRejected(f"{s.name}: cannot create a collection for a {list(vec.shape)} embedding: "
                                   f"{type(e).__name__}: {str(e).strip()[:500]}") from None
            log.info("sink %s: %d-d %s, distance %s", s.name, dim, "multi-vectors" if vec.ndim == 2 else "vectors",
                     s.distance)
        self._sinks_ready = True
