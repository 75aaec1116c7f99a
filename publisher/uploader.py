"""Worker side, off the model step: wait for each captured copy, serialize it, store it once.

A few threads drain one queue. The queue itself is bounded by the capture budget (an item
holds its bytes from capture until its upload ends), so memory stays bounded whatever the
store's speed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from publisher.capture import HostCopy
from publisher.store import ObjectStore
from publisher.tensors import encode_embedding

log = logging.getLogger("vllm_mm_events.uploader")
_STOP = object()


@dataclass
class UploadJob:
    key: str
    copy: HostCopy
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

    def __init__(self, store: ObjectStore, model: str, storage_dtype: str, threads: int = 2,
                 remember: int = 65536):
        self.store = store
        self.model = model
        self.storage_dtype = storage_dtype
        self.stats = UploaderStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._recent: OrderedDict[str, None] = OrderedDict()  # keys known stored: skip re-uploads
        self._remember = remember
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._threads = [threading.Thread(target=self._run, name=f"mm-events-upload-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def known(self, key: str) -> bool:
        with self._lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return True
            return False

    def submit(self, job: UploadJob) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            try:
                self._upload(job)
            finally:
                job.copy.release()
                with self._lock:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()

    def _upload(self, job: UploadJob) -> None:
        try:
            obj = encode_embedding(job.copy.wait(), mm_hash=job.mm_hash, modality=job.modality,
                                   model=self.model, storage_dtype=self.storage_dtype, source=job.source)
        except Exception:  # noqa: BLE001 - one bad item must not stop the uploader
            self.stats.failed += 1
            log.exception("mm-events: could not serialize item %s", job.mm_hash)
            return
        for attempt, delay in enumerate((0.0, *self.retry_delays)):
            time.sleep(delay)
            try:
                wrote = self.store.put_if_absent(job.key, obj.data, obj.object_metadata())
            except Exception as e:  # noqa: BLE001 - retried, then counted
                log.warning("mm-events: upload of %s failed (attempt %d): %s", job.key, attempt + 1, e)
                continue
            if wrote:
                self.stats.uploaded += 1
                self.stats.bytes_uploaded += len(obj.data)
            else:
                self.stats.already_stored += 1
            with self._lock:
                self._recent[job.key] = None
                if len(self._recent) > self._remember:
                    self._recent.popitem(last=False)
            return
        self.stats.failed += 1
        log.error("mm-events: giving up on %s after %d attempts; events naming it will list it missing",
                  job.key, len(self.retry_delays) + 1)

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
