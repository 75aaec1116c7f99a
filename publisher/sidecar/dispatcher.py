"""Scheduler sidecar: wait until a request's objects are durable, then publish its event.

Single-threaded by design (the sidecar's loop calls ``offer`` and ``pump``), so no locks
and no thread hand-offs per event:

1. ``offer``: a finished request and its object keys join a deadline heap;
2. ``pump``: for requests that are due, ``store.head_many`` the keys not yet known durable
   (the worker may still be uploading: retried with backoff up to ``durability_timeout_s``;
   keys seen durable are remembered for ``recheck_s``, so a repeated image costs one check
   per ten minutes, and an object a lifecycle rule deleted is named no longer), build the event
   naming only durable objects (the rest go to ``missing_embeddings``) and hand it to the
   sink; then serve the sink's delivery callbacks.

A durable outbox would slot in between building the event and handing it to the sink.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from publisher.event_sinks.base import EventSink, RecordRefused
from publisher.sidecar.events import FinishedRequest, StoredItem, build_event
from publisher.sidecar.messages import RECHECK_S
from publisher.sidecar.metrics import PublisherMetrics, ReportCounters
from publisher.sidecar.outbox import Outbox, SpoolError
from publisher.stores.base import ObjectStore
from schemas.objects import extras_from_store_metadata

log = logging.getLogger("vllm_mm_events.dispatcher")
MAX_WAIT = 0.05  # longest pause between pumps while events are in flight
# A request is checked as it arrives, in the same wake-up: its objects were captured when its
# encoder ran, steps before it finished, and are usually stored by then. If not, the next look
# is this much later, then backing off (the local store group-commits; polling sooner only burns
# CPU). Under load, events that come due together are resolved with one head_many.
FIRST_RETRY_S = 0.02


@dataclass(order=True)
class _Pending:
    next_try: float
    seq: int
    req: FinishedRequest = field(compare=False)
    keys: dict[str, str] = field(compare=False)  # mm_hash -> key
    deadline: float = field(compare=False, default=0.0)
    delay: float = field(compare=False, default=0.0)
    unreached: frozenset[str] = field(compare=False, default=frozenset())  # mm_hashes no encoder ran for here


class DispatcherStats(ReportCounters):
    # dropped: in the engine under backpressure=drop, never accepted here; replayed: taken from the
    # outbox at start (left unacknowledged by an earlier run); resent: produced again by the sink.
    names = ("accepted", "published", "incomplete", "failed", "dropped", "store_errors", "replayed", "unspooled",
             "resent")


class EventDispatcher:
    def __init__(self, store: ObjectStore, sink: EventSink, producer: dict[str, str], *,
                 durability_timeout_s: float, remember: int = 65536, recheck_s: float = RECHECK_S,
                 on_settled: Callable[[int], None] | None = None, outbox: Outbox | None = None,
                 metrics: PublisherMetrics | None = None, on_spooled: Callable[[int], None] | None = None):
        self.store = store
        self.outbox = outbox  # finished requests are spooled here until the sink has their events
        self.sink = sink
        self.producer = producer
        self.durability_timeout_s = durability_timeout_s
        self.stats = DispatcherStats(metrics)
        self.metrics = metrics
        self._on_settled = on_settled  # told the running count of settled (delivered or failed) events
        self._settled = 0
        self._waiting: list[_Pending] = []
        self._seq = 0
        # key -> (what an event says of its object, when it was checked); checked again after recheck_s
        self._durable: OrderedDict[str, tuple[StoredItem, float]] = OrderedDict()
        self._foreign: OrderedDict[str, float] = OrderedDict()  # keys holding objects that are not the publisher's
        self._remember = remember
        self._recheck_s = recheck_s
        self._force_at = float("inf")  # on close: publish with what is durable by then
        self._unsynced: list[float] = []  # finish times of requests spooled since the last sync
        self._on_spooled = on_spooled  # told the running count of engine requests whose spool write is settled
        self._spool_settled = 0  # engine requests synced into the spool (or that failed to be)
        self._spool_pending = 0
        self._gauges: tuple[int, int] | None = None  # what the metrics gauges were last set to
        if metrics is not None and outbox is not None:  # what spool_bytes is compared with, in one scrape
            metrics.spool_max_bytes.set(outbox.max_bytes)

    @property
    def in_flight(self) -> int:
        """Accepted and not yet delivered or failed."""
        return self.stats.accepted - self._settled

    def spool(self, req: FinishedRequest, keys: dict[str, str]) -> None:
        """Write a request from the engine to the outbox, durable at the next ``pump``'s sync (which tells
        ``on_spooled``), without taking it into flight: the sidecar spools what it reads past the in-flight
        cap at once and offers it later, so a response held for ``durable_before_return`` is not held for
        the sink."""
        if self.outbox is None:
            return
        self._spool_pending += 1
        try:
            self.outbox.append(req, keys)
            if self.metrics is not None:
                self._unsynced.append(req.finished_time)
        except SpoolError as e:  # full (the sidecar stops reading before this), or a failing disk
            self.stats.inc("unspooled", e.requests)
            log.error("mm-events: request %s not spooled, published without the spool: %s", req.request_id, e)

    def offer(self, req: FinishedRequest, keys: dict[str, str], *, spooled: bool = False,
              replayed: bool = False) -> None:
        """Take a finished request into flight, spooling it first unless it was: by ``spool`` (``spooled``),
        or by an earlier run that left it unacknowledged (``replayed``: from the outbox at start)."""
        if not (spooled or replayed):
            self.spool(req, keys)
        if replayed:
            self.stats.inc("replayed")
        now = time.monotonic()
        self._seq += 1
        self.stats.inc("accepted")
        heapq.heappush(self._waiting, _Pending(now, self._seq, req, keys, now + self.durability_timeout_s,
                                               FIRST_RETRY_S / 2, frozenset(i.mm_hash for i in req.items
                                                                            if i.unreached)))

    def pump(self) -> float:
        """Do what is due; returns how long the caller may wait before the next pump."""
        if self.outbox is not None:
            try:
                self.outbox.sync()  # one fsync for what was offered since the last pump, before any is sent
            except SpoolError as e:  # a failing disk: they are published without the spool
                self.stats.inc("unspooled", e.requests)
                log.error("mm-events: %d request(s) not spooled, published without the spool: %s", e.requests, e)
            if self._unsynced:  # the window in which a returned response's event was not yet durable
                now = time.time()
                for finished in self._unsynced:
                    self.metrics.spool_lag.observe(max(0.0, now - finished))
                self._unsynced.clear()
            if self._spool_pending:
                self._spool_settled += self._spool_pending
                self._spool_pending = 0
                if self._on_spooled is not None:
                    self._on_spooled(self._spool_settled)
        now = time.monotonic()
        due = []
        while self._waiting and self._waiting[0].next_try <= now:
            due.append(heapq.heappop(self._waiting))
        if due:
            self._resolve(due)
        self.sink.poll(0)
        resent = self.sink.resends - self.stats.resent
        if resent:
            self.stats.inc("resent", resent)
        gauges = (self.in_flight, self.outbox.bytes if self.outbox is not None else 0)
        if self.metrics is not None and gauges != self._gauges:  # each set writes a shared file
            self._gauges = gauges
            self.metrics.in_flight.set(gauges[0])
            self.metrics.spool_bytes.set(gauges[1])
        if self._waiting:
            return max(0.0, min(MAX_WAIT, self._waiting[0].next_try - time.monotonic()))
        return MAX_WAIT

    def _resolve(self, due: list[_Pending]) -> None:
        now = time.monotonic()
        unknown = list({k for p in due for k in p.keys.values()
                        if not self._is_durable(k, now) and not self._is_foreign(k, now)})
        checked = True
        if unknown:
            try:
                infos = self.store.head_many(unknown)
            except Exception as e:  # noqa: BLE001 - retried on the next pass
                # A verdict due for its re-check stands meanwhile: an outage is no news of a deletion.
                self.stats.inc("store_errors")
                log.warning("mm-events: cannot check %d object(s): %s", len(unknown), e)
                infos, checked = [], False
            for key, info in zip(unknown, infos):
                self._foreign.pop(key, None)
                if info is None:
                    self._durable.pop(key, None)  # not there (any more)
                    continue
                try:
                    self._remember_durable(key, info)
                except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
                    self._durable.pop(key, None)
                    # A bucket writer's object, or one whose metadata a gateway dropped: never durable (its
                    # requests wait for their deadline and list it missing), never a crash (the spooled request
                    # would replay it on every start). Remembered, so it is checked and reported once.
                    self.stats.inc("store_errors")
                    log.warning("mm-events: the object at %s is not the publisher's (its metadata: %s: %s); "
                                "events will list it missing", key, type(e).__name__, e)
                    self._foreign[key] = now
                    if len(self._foreign) > self._remember:
                        self._foreign.popitem(last=False)
        now = time.monotonic()
        for p in due:
            stored = {h: self._durable[k][0] for h, k in p.keys.items() if k in self._durable}
            # An item the request never reached has nothing on its way: the check above says all there is.
            awaited = [h for h in p.keys if h not in stored and not (checked and h in p.unreached)]
            if not awaited or now >= min(p.deadline, self._force_at):
                if self.metrics is not None:
                    self.metrics.durability_wait.observe(now - (p.deadline - self.durability_timeout_s))
                self._publish(p.req, stored)
            else:
                p.delay = min(p.delay * 2, 0.25)
                p.next_try = min(now + p.delay, self._force_at)
                heapq.heappush(self._waiting, p)

    def _is_durable(self, key: str, now: float) -> bool:
        """Seen durable within ``recheck_s`` (after it, checked again: a lifecycle rule or an operator may
        have deleted it; the verdict stands until a check answers)."""
        seen = self._durable.get(key)
        if seen is None or now - seen[1] >= self._recheck_s:
            return False
        self._durable.move_to_end(key)
        return True

    def _is_foreign(self, key: str, now: float) -> bool:
        """Seen not the publisher's within ``recheck_s`` (after it, checked again: it may have been put right)."""
        seen = self._foreign.get(key)
        return seen is not None and now - seen < self._recheck_s

    def _remember_durable(self, key: str, info) -> None:
        """Raises if the metadata is not what the publisher writes (an event naming it could not be encoded)."""
        m = info.metadata
        item = StoredItem(self.store.uri(key), m["sha256"], info.size, m["dtype"], tuple(json.loads(m["shape"])),
                          extras_from_store_metadata(m))
        if not (isinstance(item.sha256, str) and isinstance(item.dtype, str)
                and all(type(d) is int for d in item.shape)):
            raise ValueError("sha256, dtype or shape of another type")
        self._durable[key] = (item, time.monotonic())
        if len(self._durable) > self._remember:
            self._durable.popitem(last=False)

    def _publish(self, req: FinishedRequest, stored: dict[str, StoredItem]) -> None:
        event = build_event(req, stored, self.producer)
        unreached = {i.mm_hash for i in req.items if i.unreached}
        late = [h for h in event["missing_embeddings"] if h not in unreached]  # what an outage left out
        if late:
            self.stats.inc("incomplete")
            log.warning("mm-events: request %s published without %d object(s) not durable in time: %s",
                        req.request_id, len(late), ", ".join(late))

        def done(err: Exception | None) -> None:
            if err is None:
                self.stats.inc("published")
            else:
                self.stats.inc("failed")
                log.error("mm-events: event %s for request %s was not delivered: %s",
                          req.event_id, req.request_id, err)
            if self.outbox is not None and (err is None or isinstance(err, RecordRefused)):
                self.outbox.ack(req.event_id)  # a delivery failure stays spooled for the next start
            self._settled += 1
            if self._on_settled is not None:
                self._on_settled(self._settled)

        try:
            self.sink.publish(event, done)
        except Exception as e:  # noqa: BLE001 - an event the codec refuses, a record too large: must not stop
            done(RecordRefused(f"{type(e).__name__}: {e}"))  # the sidecar; every replay would fail alike

    def close(self, timeout: float) -> int:
        """Bounded: publish what can be, report what could not. Returns the undelivered count."""
        deadline = time.monotonic() + timeout
        # Leave a third of the time for the sink to deliver what gets published.
        self._force_at = time.monotonic() + timeout * 2 / 3
        for p in self._waiting:
            p.next_try = min(p.next_try, self._force_at)
        heapq.heapify(self._waiting)
        while self._waiting and time.monotonic() < deadline:
            time.sleep(self.pump())
        self.sink.flush(max(0.0, deadline - time.monotonic()))
        left = self.in_flight
        if left:
            where = f"; they stay in the outbox ({self.outbox.dir}) for the next start" if self.outbox else ""
            log.error("mm-events: shutdown left %d event(s) undelivered%s", left, where)
        self.sink.close()
        if self.outbox is not None:
            self.outbox.close()
        return left
