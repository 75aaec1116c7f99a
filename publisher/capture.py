"""Worker side, inside the model step: get an encoder output to host memory without stalling.

On a GPU, ``capture()`` only *launches* the copy: a pinned host buffer from a bounded
pool, a side stream ordered after the producing stream by an event, ``copy_(...,
non_blocking=True)`` and ``record_stream`` so the caching allocator keeps the source alive.
A synchronous ``.cpu()`` here stalls the whole step (60-98% of throughput; see
``benchmarks/capture_gpu.py``). On CPU the "copy" is just a reference: the encoder cache
never writes into a tensor it has handed out.

In-flight host memory is bounded by ``InflightBudget``. When it is exhausted the
configured policy applies: ``block`` waits for uploads to free room (the engine slows to
the store's pace, nothing is lost), ``drop`` skips the item and counts it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch


class InflightBudget:
    """A byte budget shared by everything captured but not yet uploaded."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, block: bool, timeout: float | None = None) -> bool:
        # An item larger than the whole budget is admitted alone rather than never.
        with self._cond:
            def fits() -> bool:
                return self.used == 0 or self.used + nbytes <= self.max_bytes
            if not fits():
                if not block or not self._cond.wait_for(fits, timeout):
                    return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


@dataclass
class HostCopy:
    """A captured tensor: ``wait()`` returns it on the host once the copy has landed."""
    host: torch.Tensor
    nbytes: int
    _done: "torch.cuda.Event | None" = None
    _on_release: Callable[[], None] | None = field(default=None, repr=False)

    def wait(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()  # blocks this (upload) thread only, with the GIL released
        return self.host

    def release(self) -> None:
        if self._on_release is not None:
            cb, self._on_release = self._on_release, None
            cb()


class _PinnedPool:
    """Reusable pinned host buffers in power-of-two size classes (pinning is slow: do it once)."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        size = 1 << max(12, (nbytes - 1).bit_length())
        with self._lock:
            bucket = self._free.get(size)
            if bucket:
                return bucket.pop()
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.numel(), []).append(buf)

    def trim(self) -> None:
        with self._lock:
            self._free.clear()


class DeviceToHostCapture:
    def __init__(self, budget: InflightBudget, block: bool):
        self.budget = budget
        self.block = block
        self._pool = _PinnedPool()
        self._streams: dict[torch.device, "torch.cuda.Stream"] = {}

    def capture(self, t: torch.Tensor) -> HostCopy | None:
        """Called in the model step. Returns None when the item is dropped under backpressure."""
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if not self.budget.acquire(nbytes, self.block):
            return None
        if t.device.type == "cpu":
            return HostCopy(t, nbytes, None, lambda: self.budget.release(nbytes))
        if t.device.type != "cuda":
            # Other accelerators: a plain copy. Correct, not tuned.
            return HostCopy(t.to("cpu"), nbytes, None, lambda: self.budget.release(nbytes))
        return self._capture_cuda(t, nbytes)

    def _capture_cuda(self, t: torch.Tensor, nbytes: int) -> HostCopy:
        stream = self._streams.get(t.device)
        if stream is None:
            stream = self._streams[t.device] = torch.cuda.Stream(device=t.device)
        buf = self._pool.take(nbytes)
        host = buf[:nbytes].view(t.dtype).view(t.shape)
        produced = torch.cuda.current_stream(t.device).record_event()
        stream.wait_event(produced)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(stream)
            done = stream.record_event()

        def release() -> None:
            self._pool.give(buf)
            self.budget.release(nbytes)

        return HostCopy(host, nbytes, done, release)
