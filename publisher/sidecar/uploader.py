"""Worker sidecar: serialize each captured tensor and store it once, with retries.

A few threads drain one queue. The queue is bounded by the shared ring: an item holds
its ring region from capture until its upload ends, so memory stays bounded whatever the
store's speed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from publisher.sidecar.encode import encode_embedding
from publisher.stores.base import ObjectStore

log = logging.getLogger("vllm_mm_events.uploader")
_STOP = object()


@dataclass
class UploadJob:
    key: str
    tensor: torch.Tensor  # in host memory (a view on the shared ring)
    release: Callable[[], None]  # called once the uploader is done with ``tensor``
    mm_hash: str
    modality: str
    source: str


class UploaderStats:
    def __init__(self) -> None:
        self.uploaded = 0
        self.already_stored = 0
        self.failed = 0
        self.bytes_uploaded = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class ObjectUploader:
    retry_delays = (0.2, 1.0, 5.0)
    max_batch = 64

    def __init__(self, store: ObjectStore, model: str, storage_dtype: str, threads: int = 2):
        # A group-committing store gets one thread that lingers for company; others get
        # parallel threads and no linger (an S3 PUT is a round trip, not a sync).
        self.linger_s = store.commit_linger_s
        threads = 1 if self.linger_s else threads
        self.store = store
        self.model = model
        self.storage_dtype = storage_dtype
        self.stats = UploaderStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._run, name=f"mm-events-upload-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def submit(self, job: UploadJob) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Whatever else is queued, or arrives within the linger, goes in one group commit:
            # a store that syncs per batch (the local directory) then pays one sync for many.
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.max_batch and batch[-1] is not _STOP:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            stops = sum(job is _STOP for job in batch)
            for _ in range(stops - 1):
                self._queue.put(_STOP)  # the other threads' stop signals
            jobs = [job for job in batch if job is not _STOP]
            try:
                self._upload(jobs)
            finally:
                for job in jobs:
                    job.release()
                with self._lock:
                    self._pending -= len(jobs)
                    if not self._pending:
                        self._idle.notify_all()
            if stops:
                return

    def _upload(self, jobs: list[UploadJob]) -> None:
        encoded = []
        for job in jobs:
            try:
                obj = encode_embedding(job.tensor, mm_hash=job.mm_hash, modality=job.modality,
                                       model=self.model, storage_dtype=self.storage_dtype, source=job.source)
                encoded.append((job.key, obj.data, obj.object_metadata()))
            except Exception:  # noqa: BLE001 - one bad item must not stop the uploader
                self._count("failed")
                log.exception("mm-events: could not serialize item %s", job.mm_hash)
        if not encoded:
            return
        try:
            results = self.store.put_many(encoded)
        except Exception as e:  # noqa: BLE001 - retried one by one below
            log.warning("mm-events: batch upload of %d objects failed (%s); retrying one by one", len(encoded), e)
            results = [self._put_with_retries(*item) for item in encoded]
        for (key, data, _), wrote in zip(encoded, results):
            if wrote is None:
                continue
            self._count("uploaded" if wrote else "already_stored")
            if wrote:
                self._count("bytes_uploaded", len(data))

    def _put_with_retries(self, key: str, data: bytes, meta: dict[str, str]) -> bool | None:
        for attempt, delay in enumerate(self.retry_delays):
            time.sleep(delay)
            try:
                return self.store.put_if_absent(key, data, meta)
            except Exception as e:  # noqa: BLE001 - retried, then counted
                log.warning("mm-events: upload of %s failed (attempt %d): %s", key, attempt + 2, e)
        self._count("failed")
        log.error("mm-events: giving up on %s after %d attempts; events naming it will list it missing",
                  key, len(self.retry_delays) + 1)
        return None

    def drain(self, timeout: float) -> int:
        """Wait until queued uploads finish; returns how many are still pending."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout)
            return self._pending

    def close(self, timeout: float) -> int:
        left = self.drain(timeout)
        for _ in self._threads:
            self._queue.put(_STOP)
        return left
