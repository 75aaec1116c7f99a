"""Worker sidecar: serialize each captured tensor and store it once, retrying through outages.

A few threads drain one queue. The queue is bounded by the shared ring: an item holds
its ring region from capture until its upload ends, so memory stays bounded whatever the
store's speed, and an outage of the store ends in the engine's backpressure policy once
the ring is full, not in lost objects.

A failed upload is retried with capped exponential backoff until ``retry_for_s`` after
the item was captured (the publisher passes ``durability_timeout_s``: past it the
scheduler publishes the event without the object anyway). A permanent error (access
denied, no such bucket) gets a few more tries only: an operator has to fix it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from publisher.sidecar.encode import encode_embedding
from publisher.sidecar.metrics import PublisherMetrics, ReportCounters
from publisher.stores.base import ObjectStore, PermanentStoreError

log = logging.getLogger("vllm_mm_events.uploader")


@dataclass
class UploadJob:
    key: str
    tensor: torch.Tensor  # in host memory (a view on the shared ring)
    release: Callable[[], None]  # called once the uploader is done with ``tensor``
    mm_hash: str
    modality: str
    source: str
    extras: dict = field(default_factory=dict)  # name -> small numpy array (schemas.objects: extra tensors)
    input_digest: str | None = None  # of the processed input the encoder ran on (reuse_stored_embeddings)
    captured_at: float = field(default_factory=time.monotonic)


def _nbytes(job: UploadJob) -> int:
    return job.tensor.numel() * job.tensor.element_size()


class UploaderStats(ReportCounters):
    names = ("uploaded", "already_stored", "upload_failed", "retries", "bytes_uploaded")


class ObjectUploader:
    first_retry_s = 0.2
    max_retry_s = 5.0
    permanent_attempts = 3
    max_batch = 64
    # A batch stops growing at this many tensor bytes. One sync or a few parallel PUTs are amortized
    # well before it; past it, batching only delays the first write (every item is serialized
    # before any is stored) and holds more serialized copies: at most this much (plus one item)
    # per thread beyond the ring.
    max_batch_bytes = 8 << 20

    def __init__(self, store: ObjectStore, model: str, storage_dtype: str, threads: int = 2,
                 retry_for_s: float = 60.0, metrics: PublisherMetrics | None = None,
                 after_release: Callable[[], None] | None = None, not_stored: Callable[[str], None] | None = None):
        # Every thread takes a batch of what is queued. A group-committing store's threads linger
        # for company (one sync for many objects), and two of them overlap one batch's sync with
        # the next one's hashing and writes; other stores do not linger (an S3 PUT is a round trip,
        # not a sync).
        self.linger_s = store.commit_linger_s
        self.store = store
        self.model = model
        self.storage_dtype = storage_dtype
        self.retry_for_s = retry_for_s
        # Called once a batch's jobs are all released: the sidecar tells the engine about a whole
        # batch's ring regions in one message.
        self.after_release = after_release
        self.not_stored = not_stored  # told each key the store never took, before its batch's after_release
        self.stats = UploaderStats(metrics)
        # Jobs wait in one deque under one lock. A thread that finds work collects a batch: it waits
        # out the linger (or until the batch is full) with one timed wait, while the engine's items
        # simply join the deque; a submit wakes a thread only when nobody is collecting or the batch
        # is full. (A queue.get per item woke the collecting thread for every item: a futex
        # round trip and a GIL hand-off each, more CPU than storing the item.)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # idle threads: a batch can be started
        self._filled = threading.Condition(self._lock)  # the collecting thread: the batch is full
        self._jobs: deque[UploadJob] = deque()
        self._jobs_bytes = 0
        self._collecting = False
        self._stopping = False
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._close_by = float("inf")
        self._threads = [threading.Thread(target=self._run, name=f"mm-events-upload-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats.inc(name, n)

    def submit(self, job: UploadJob) -> None:
        with self._lock:
            self._pending += 1
            self._jobs.append(job)
            self._jobs_bytes += _nbytes(job)
            if not self._collecting:
                self._work.notify()
            elif self._batch_full():
                self._filled.notify()

    def _batch_full(self) -> bool:
        return len(self._jobs) >= self.max_batch or self._jobs_bytes >= self.max_batch_bytes

    def _next_batch(self) -> list[UploadJob] | None:
        """What is queued, or arrives within the linger, as one group commit (up to max_batch items
        and max_batch_bytes): a store that syncs per batch (the local directory) pays one sync for
        many. None once stopping with nothing left."""
        with self._lock:
            while self._collecting or not self._jobs:
                if self._stopping and not self._jobs:
                    return None
                self._work.wait()
            self._collecting = True
            deadline = time.monotonic() + self.linger_s
            while not self._batch_full() and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._filled.wait(left)
            batch, size = [], 0
            while self._jobs and len(batch) < self.max_batch and (not batch or size < self.max_batch_bytes):
                batch.append(self._jobs.popleft())
                size += _nbytes(batch[-1])
            self._jobs_bytes -= size
            self._collecting = False
            if self._jobs:
                self._work.notify()  # the rest starts the next batch on another thread
            elif self._stopping:
                self._work.notify_all()  # closing: the others may exit now
            return batch

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            try:
                self._upload(jobs)
            finally:
                for job in jobs:
                    job.release()
                if self.after_release is not None:
                    self.after_release()
                with self._lock:
                    self._pending -= len(jobs)
                    if not self._pending:
                        self._idle.notify_all()

    def _upload(self, jobs: list[UploadJob]) -> None:
        encoded = []
        for job in jobs:
            try:
                obj = encode_embedding(job.tensor, mm_hash=job.mm_hash, modality=job.modality,
                                       model=self.model, storage_dtype=self.storage_dtype, source=job.source,
                                       extras=job.extras, input_digest=job.input_digest)
                encoded.append((job, (job.key, obj.data, obj.object_metadata())))
            except Exception:  # noqa: BLE001 - one bad item must not stop the uploader
                self._count("upload_failed")
                log.exception("mm-events: could not serialize item %s", job.mm_hash)
        if not encoded:
            return
        try:
            results = self.store.put_many([item for _, item in encoded])
        except Exception as e:  # noqa: BLE001 - retried below
            log.warning("mm-events: batch upload of %d objects failed (%s); retrying until each is stored",
                        len(encoded), e)
            results = self._retry(encoded)
        # Counted once per batch: each count is a lock and, with metrics, a shared-file write.
        wrote = [data for (_, (_, data, _)), ok in zip(encoded, results) if ok]
        self._count("uploaded", len(wrote))
        self._count("already_stored", sum(ok is False for ok in results))
        self._count("bytes_uploaded", sum(len(data) for data in wrote))

    def _retry(self, encoded: list[tuple[UploadJob, tuple[str, bytes, dict[str, str]]]]) -> list[bool | None]:
        """Retry in rounds with capped exponential backoff; None for an item never stored.

        A round goes through the items in order and stops at the first transient failure: the
        store is still away, and one probe per round is enough (against a hung server, each
        try costs a client timeout). An item is given up at its deadline (``retry_for_s``
        after capture, or the close budget), or after a few permanent refusals (access denied:
        an operator has to act). Its ring region stays held meanwhile: a long outage fills the
        ring, and then the engine's backpressure policy decides, as for a slow store."""
        results: list[bool | None] = [None] * len(encoded)
        left = list(range(len(encoded)))
        refusals = [0] * len(encoded)
        delay, attempt = self.first_retry_s, 1
        while left:
            now = time.monotonic()
            deadlines = {i: min(encoded[i][0].captured_at + self.retry_for_s, self._close_by) for i in left}
            for i in [i for i in left if deadlines[i] <= now]:
                self._give_up(encoded[i][1][0], attempt)
            left = [i for i in left if deadlines[i] > now]
            if not left:
                break
            wait = min(delay, min(deadlines.values()) - now)
            if self._closing.is_set():
                time.sleep(max(0.0, wait))
            else:
                self._closing.wait(max(0.0, wait))  # close() wakes it to apply the flush budget
            attempt += 1
            still = []
            for n, i in enumerate(left):
                key, data, meta = encoded[i][1]
                self._count("retries")
                try:
                    results[i] = self.store.put_if_absent(key, data, meta)
                except PermanentStoreError as e:
                    refusals[i] += 1
                    log.warning("mm-events: upload of %s refused (attempt %d): %s", key, attempt, e)
                    if refusals[i] >= self.permanent_attempts:
                        self._give_up(key, attempt)
                    else:
                        still.append(i)
                except Exception as e:  # noqa: BLE001 - the store is still away: try again next round
                    log.warning("mm-events: upload of %s failed (attempt %d; %d object(s) waiting, retried until "
                                "%.0f s after capture): %s", key, attempt, len(left), self.retry_for_s, e)
                    still += left[n:]
                    break
            left = still
            delay = min(delay * 2, self.max_retry_s)
        return results

    def _give_up(self, key: str, attempts: int) -> None:
        self._count("upload_failed")
        log.error("mm-events: giving up on %s after %d attempt(s); events naming it will list it missing", key,
                  attempts)
        if self.not_stored is not None:
            self.not_stored(key)

    def drain(self, timeout: float) -> int:
        """Wait until queued uploads finish; returns how many are still pending."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout)
            return self._pending

    def close(self, timeout: float) -> int:
        self._close_by = time.monotonic() + timeout
        self._closing.set()
        left = self.drain(timeout)
        with self._lock:
            self._stopping = True
            self._work.notify_all()
            self._filled.notify_all()
        return left
