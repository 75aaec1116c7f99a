"""Scheduler side, off the scheduler loop: wait until a request's objects are durable, then publish.

``request_finished`` only enqueues a ``FinishedRequest``. One thread here:
1. resolves each item's object with ``store.head`` (the worker may still be uploading;
   it retries with backoff until ``durability_timeout_s``), remembering keys already seen
   durable, so a repeated image costs nothing;
2. builds the event, naming only durable objects (the rest go to ``missing_embeddings``);
3. hands it to the sink and serves delivery callbacks.

A durable outbox would slot in between 2 and 3: persist the built event, then publish.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from publisher.events import FinishedRequest, StoredItem, build_event
from publisher.sinks import EventSink
from publisher.store import ObjectStore

log = logging.getLogger("vllm_mm_events.dispatcher")


@dataclass(order=True)
class _Pending:
    next_try: float
    seq: int
    req: FinishedRequest = field(compare=False)
    keys: dict[str, str] = field(compare=False)  # mm_hash -> key
    deadline: float = field(compare=False, default=0.0)
    delay: float = field(compare=False, default=0.002)


class DispatcherStats:
    def __init__(self) -> None:
        self.accepted = 0
        self.published = 0
        self.incomplete = 0
        self.dropped = 0
        self.failed = 0
        self.store_errors = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class EventDispatcher:
    def __init__(self, store: ObjectStore, sink: EventSink, producer: dict[str, str], *,
                 max_pending: int, block: bool, durability_timeout_s: float, head_threads: int = 4,
                 remember: int = 65536):
        self.store = store
        self.sink = sink
        self.producer = producer
        self.block = block
        self.durability_timeout_s = durability_timeout_s
        self.stats = DispatcherStats()
        self._max_pending = max_pending
        self._inbox: list[tuple[FinishedRequest, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._in_system = 0  # accepted and not yet delivered or failed
        self._closing = False
        self._force_at = float("inf")  # on close: publish with what is durable by then
        self._durable: OrderedDict[str, StoredItem] = OrderedDict()
        self._remember = remember
        self._heads = ThreadPoolExecutor(head_threads, thread_name_prefix="mm-events-head")
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="mm-events-dispatch", daemon=True)
        self._thread.start()

    # ---- called on the scheduler loop: O(1), no I/O ----------------------------------
    def submit(self, req: FinishedRequest, keys: dict[str, str]) -> bool:
        with self._cond:
            if self._in_system >= self._max_pending:
                if not self.block:
                    self.stats.dropped += 1
                    return False
                self._cond.wait_for(lambda: self._in_system < self._max_pending or self._closing)
            if self._closing:
                self.stats.dropped += 1
                return False
            self._in_system += 1
            self.stats.accepted += 1
            self._inbox.append((req, keys))
            self._cond.notify_all()
            return True

    # ---- the dispatch thread ------------------------------------------------------------
    def _run(self) -> None:
        waiting: list[_Pending] = []
        while True:
            with self._cond:
                timeout = 0.05
                if waiting:
                    timeout = min(timeout, max(0.0, waiting[0].next_try - time.monotonic()))
                if not self._inbox and timeout > 0:
                    self._cond.wait(timeout)
                inbox, self._inbox = self._inbox, []
                closing = self._closing
            now = time.monotonic()
            for req, keys in inbox:
                self._seq += 1
                heapq.heappush(waiting, _Pending(now, self._seq, req, keys, now + self.durability_timeout_s))
            due = []
            while waiting and waiting[0].next_try <= now:
                due.append(heapq.heappop(waiting))
            if due:
                self._resolve(due, waiting)
            self.sink.poll(0)
            if closing and not waiting and not self._inbox:
                return

    def _resolve(self, due: list[_Pending], waiting: list[_Pending]) -> None:
        unknown = {k for p in due for k in p.keys.values() if not self._is_durable(k)}
        if unknown:
            for key, info in zip(unknown, self._heads.map(self._head, unknown)):
                if info is not None:
                    self._remember_durable(key, info)
        now = time.monotonic()
        for p in due:
            stored = {h: self._durable[k] for h, k in p.keys.items() if k in self._durable}
            if len(stored) == len(p.keys) or now >= min(p.deadline, self._force_at):
                self._publish(p.req, stored)
            else:
                p.delay = min(p.delay * 2, 0.25)
                p.next_try = now + p.delay
                heapq.heappush(waiting, p)

    def _head(self, key: str):
        try:
            return self.store.head(key)
        except Exception as e:  # noqa: BLE001 - retried on the next pass
            self.stats.store_errors += 1
            log.warning("mm-events: cannot check object %s: %s", key, e)
            return None

    def _is_durable(self, key: str) -> bool:
        if key in self._durable:
            self._durable.move_to_end(key)
            return True
        return False

    def _remember_durable(self, key: str, info) -> None:
        m = info.metadata
        self._durable[key] = StoredItem(self.store.uri(key), m["sha256"], info.size, m["dtype"],
                                        tuple(json.loads(m["shape"])))
        if len(self._durable) > self._remember:
            self._durable.popitem(last=False)

    def _publish(self, req: FinishedRequest, stored: dict[str, StoredItem]) -> None:
        event = build_event(req, stored, self.producer)
        if event["missing_embeddings"]:
            self.stats.incomplete += 1
            log.warning("mm-events: request %s published without %d object(s) not durable in %.0fs: %s",
                        req.request_id, len(event["missing_embeddings"]), self.durability_timeout_s,
                        ", ".join(event["missing_embeddings"]))

        def done(err: Exception | None) -> None:
            if err is None:
                self.stats.published += 1
            else:
                self.stats.failed += 1
                log.error("mm-events: event %s for request %s was not delivered: %s",
                          req.event_id, req.request_id, err)
            with self._cond:
                self._in_system -= 1
                self._cond.notify_all()

        try:
            self.sink.publish(event, done)
        except Exception as e:  # noqa: BLE001 - an encoding bug must not kill the thread
            done(e)

    # ---- shutdown -----------------------------------------------------------------------
    def flush(self, timeout: float) -> int:
        """Wait until every accepted event is delivered or failed; returns how many are left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.wait_for(lambda: self._in_system == 0, timeout)
        self.sink.flush(max(0.0, deadline - time.monotonic()))
        with self._cond:
            return self._in_system

    def close(self, timeout: float) -> int:
        """Bounded: publish what can be, report what could not. Returns the undelivered count."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            # Leave a third of the time for the sink to deliver what gets published.
            self._force_at = time.monotonic() + timeout * 2 / 3
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        left_in_sink = self.sink.flush(max(0.0, deadline - time.monotonic()))
        self._heads.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            left = self._in_system
        if left or left_in_sink:
            log.error("mm-events: shutdown left %d event(s) undelivered", left)
        self.sink.close()
        return left
