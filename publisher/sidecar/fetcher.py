"""Fetch sidecar (``reuse_stored_embeddings``): stored encoder outputs -> host memory the worker loads from.

The scheduler half asks for an item when a request carrying it arrives (``Fetch``), naming a region
of the staging ring it allocated. This process GETs the object, checks that it may stand in for an
encoder run, and writes the tensor's raw bytes into that region. The ring is a file in a private
tmpfs directory (``/dev/shm``, mode 0700) that the worker maps too (page-locked once on a GPU), so
the load in the step is one DMA (or memcpy) from it. Nothing here runs on vLLM's loops.

An object is used only if every check passes; otherwise the answer says why and the encoder runs:

- absent: no object under the key yet (a plain miss);
- its bytes hash to the SHA-256 the store recorded when it was written;
- it is this format, ``source=ENCODER``, this model, this ``mm_hash``, and its ``input_digest``
  equals the digest of the request's own processed input (same preprocessing, same pixels);
- its values need no rounding to be the model's: ``encoder_dtype`` is the model's dtype, stored in
  it or in float32 (a widening, undone exactly), and in the dtype the key names;
- its shape is (the item's number of embeddings, the model's hidden size).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from publisher.sidecar.messages import Fetch, Fetched
from publisher.sidecar.metrics import ReportCounters, process_identity, this_process
from publisher.stores.base import ObjectStore
from schemas.objects import FORMAT, BadObject, read_object

log = logging.getLogger("vllm_mm_events.fetcher")
HEADER_ALLOWANCE = 1 << 20  # header and extra tensors, beyond the tensor's own bytes


class FetcherStats(ReportCounters):
    names = ("reused", "fetched", "absent", "rejected", "fetch_errors", "bytes_fetched")


PRIVATE_DIR_PREFIX = "vllm-mm-events-reuse-"


def private_dir() -> Path:
    """A fresh 0700 directory on tmpfs where there is one (for the staging ring the worker maps), named
    for the process that makes it (``<pid>-<start time>``).

    Those of processes no longer running are removed first. The fetch sidecar removes its own when it
    stops, but not when it is killed outright with its engine (an OOM kill of the container), and a
    pod's ``/dev/shm`` is an in-memory emptyDir that outlives its containers: each directory left
    behind would hold ``reuse_cache_bytes`` of the pod's memory, until a restart could not take its
    ring any more."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    remove_stale_private_dirs(Path(base or tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix=f"{PRIVATE_DIR_PREFIX}{this_process()}-", dir=base))


def remove_stale_private_dirs(base: Path) -> None:
    """Remove this user's private directories in ``base`` whose process is not running (its pid free, or
    held by a process started at another time)."""
    stale = re.compile(re.escape(PRIVATE_DIR_PREFIX) + r"((\d+)-\d+)-\w+")
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        m = stale.fullmatch(entry.name)
        try:
            if not m or entry.stat(follow_symlinks=False).st_uid != os.getuid() or not entry.is_dir(
                    follow_symlinks=False) or process_identity(int(m.group(2))) == m.group(1):
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        log.info("mm-events: removed %s, left by a process no longer running", entry.path)


class Rejected(ValueError):
    """A stored object that must not stand in for an encoder run (the message says which check failed)."""


class StoredEmbeddingFetcher:
    """GETs and checks objects on a few threads; ``reply(Fetched)`` is called once per ``Fetch``."""

    def __init__(self, store: ObjectStore, ring: Path, ring_size: int, *, model: str, model_dtype: str,
                 storage_dtype: str, hidden_size: int, reply: Callable[[Fetched], None], threads: int = 4,
                 metrics=None):
        self.store, self.model = store, model
        self.model_dtype, self.storage_dtype, self.hidden_size = model_dtype, storage_dtype, hidden_size
        self.reply = reply
        self.stats = FetcherStats(metrics)
        self.ring_path = ring
        fd = os.open(ring, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Taken up front: a tmpfs that cannot hold the ring fails here, at engine start, not later
            # with a SIGBUS in the middle of a write, or in the worker page-locking it inside a step.
            try:
                os.posix_fallocate(fd, 0, ring_size)
            except OSError as e:
                raise OSError(f"reuse_cache_bytes: cannot take {ring_size} bytes in {ring.parent.parent} for the "
                              f"staging ring ({e.strerror}); lower reuse_cache_bytes or give /dev/shm more room") \
                    from None
            self.ring = mmap.mmap(fd, ring_size)
        finally:
            os.close(fd)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mm-events-fetch")

    def submit(self, msg: Fetch) -> None:
        self._pool.submit(self._run, msg)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.ring_path.parent, ignore_errors=True)

    def _run(self, msg: Fetch) -> None:
        try:
            answer = self._fetch(msg)
        except Rejected as e:
            self.stats.inc("rejected")
            log.warning("mm-events: not reusing %s: %s", msg.key, e)
            answer = Fetched(msg.mm_hash, "rejected", reason=str(e))
        except Exception as e:  # noqa: BLE001 - the store is away, a timeout: the encoder runs instead
            self.stats.inc("fetch_errors")
            log.info("mm-events: could not fetch %s for reuse: %s: %s", msg.key, type(e).__name__, e)
            answer = Fetched(msg.mm_hash, "error", reason=f"{type(e).__name__}: {e}")
        self.reply(answer)  # thread-safe: the sidecar's reply takes its send lock

    def _fetch(self, msg: Fetch) -> Fetched:
        info = self.store.head(msg.key)
        if info is None:
            self.stats.inc("absent")
            return Fetched(msg.mm_hash, "absent")
        cap = msg.num_embeds * self.hidden_size * 4 + HEADER_ALLOWANCE
        if info.size > cap:
            raise Rejected(f"{info.size} bytes, more than a ({msg.num_embeds}, {self.hidden_size}) tensor takes")
        data = self.store.get(msg.key, max_bytes=cap)
        recorded = info.metadata.get("sha256")
        if len(data) != info.size or hashlib.sha256(data).hexdigest() != recorded:
            raise Rejected("its bytes do not hash to the SHA-256 recorded when it was stored")
        try:
            stored = read_object(data)
        except BadObject as e:
            raise Rejected(str(e)) from None
        self._check(stored, msg)
        if "input_digest" not in stored.metadata:
            # This model's, written without reuse on (an older release, a replica with it off): not refused,
            # not usable either.
            log.info("mm-events: %s records no input digest; it is encoded again (never reused)", msg.key)
            self.stats.inc("absent")
            return Fetched(msg.mm_hash, "absent", reason="no input digest")
        if stored.metadata["input_digest"] != msg.input_digest:
            raise Rejected("its input digest differs from this request's processed input (another preprocessing, "
                           "or not this item)")
        raw = stored.raw.reshape(-1).view("u1")
        if msg.offset < 0 or msg.offset + raw.nbytes > len(self.ring):
            raise Rejected(f"region [{msg.offset}, +{raw.nbytes}) is outside the staging ring")
        self.ring[msg.offset:msg.offset + raw.nbytes] = raw.data
        self.stats.inc("fetched")
        self.stats.inc("bytes_fetched", raw.nbytes)
        return Fetched(msg.mm_hash, "hit")

    def _check(self, stored, msg: Fetch) -> None:
        m = stored.metadata
        expect = {"format": FORMAT, "source": "ENCODER", "model": self.model, "mm_hash": msg.mm_hash}
        for name, want in expect.items():
            if m.get(name) != want:
                raise Rejected(f"{name} is {str(m.get(name))[:80]!r}, expected {want!r}")
        if m.get("encoder_dtype") != self.model_dtype or stored.dtype not in (self.model_dtype, "float32"):
            raise Rejected(f"encoder_dtype {str(m.get('encoder_dtype'))[:40]!r} stored as {stored.dtype}: not exactly "
                           f"what this model's encoder ({self.model_dtype}) returns")
        if stored.dtype != self.storage_dtype:
            raise Rejected(f"stored as {stored.dtype} under a key that names {self.storage_dtype}")
        if stored.shape != (msg.num_embeds, self.hidden_size):
            raise Rejected(f"shape {list(stored.shape)}, expected [{msg.num_embeds}, {self.hidden_size}]")
