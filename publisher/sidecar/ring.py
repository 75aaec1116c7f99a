"""The shared ring: in-flight captured tensors, shared by the worker and its sidecar.

A ``memfd`` (no /dev/shm size limit, no names to clean up) mapped in the worker and, through
its inherited fd, in the sidecar. The worker allocates a region per captured item and
copies into it; the sidecar reads the item from it, stores it, and tells the worker to
free it. Its size is ``max_inflight_bytes``: the bound on the worker's in-flight memory.
"""

from __future__ import annotations

import mmap
import os
from collections import deque

import torch

ALIGN = 256


class RingAllocator:
    """Contiguous regions handed out in order, freed in any order; space is reclaimed from the
    oldest region on. Single-threaded by design: only the model-runner thread allocates, and
    frees are applied by that same thread."""

    def __init__(self, size: int):
        self.size = size
        self._live: deque[list] = deque()  # [offset, nbytes, freed]
        self._by_offset: dict[int, list] = {}
        self._head = 0
        self.used = 0

    def alloc(self, nbytes: int) -> int | None:
        n = -(-max(nbytes, 1) // ALIGN) * ALIGN
        if n > self.size:
            return None
        if not self._live:
            pos = 0
        else:
            # Live regions run from tail to head; the ring has wrapped when head <= tail.
            tail = self._live[0][0]
            if self._head > tail:
                pos = self._head if self._head + n <= self.size else (0 if n <= tail else None)
            else:
                pos = self._head if self._head + n <= tail else None
        if pos is None:
            return None
        region = [pos, n, False]
        self._live.append(region)
        self._by_offset[pos] = region
        self._head = pos + n
        self.used += n
        return pos

    def free(self, offset: int) -> None:
        region = self._by_offset.pop(offset)
        region[2] = True
        while self._live and self._live[0][2]:
            self.used -= self._live.popleft()[1]
        if not self._live:
            self._head = 0


class SpanAllocator:
    """Regions of one buffer, freed in any order and reused first-fit (free neighbours merge).

    For a staging area whose regions live for different times (``reuse_stored_embeddings``: a
    promised item outlives the ones fetched after it), where the ring's oldest-first reclaim
    would let one long-lived region block the rest. Single-threaded, like ``RingAllocator``."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[list[int]] = [[0, size]]  # [offset, nbytes], by offset, never adjacent
        self._taken: dict[int, int] = {}
        self.used = 0

    def alloc(self, nbytes: int) -> int | None:
        n = -(-max(nbytes, 1) // ALIGN) * ALIGN
        for i, span in enumerate(self._free):
            if span[1] >= n:
                offset = span[0]
                span[0] += n
                span[1] -= n
                if not span[1]:
                    del self._free[i]
                self._taken[offset] = n
                self.used += n
                return offset
        return None

    def free(self, offset: int) -> None:
        n = self._taken.pop(offset)
        self.used -= n
        i = next((i for i, s in enumerate(self._free) if s[0] > offset), len(self._free))
        self._free.insert(i, [offset, n])
        if i + 1 < len(self._free) and offset + n == self._free[i + 1][0]:  # merge with the next
            self._free[i][1] += self._free.pop(i + 1)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and with the previous
            self._free[i - 1][1] += self._free.pop(i)[1]


class SharedRing:
    """A memfd mapped here and, through its fd, in the sidecar."""

    def __init__(self, size: int):
        self.size = size
        self.fd = os.memfd_create("vllm-mm-events-ring", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._mmap = mmap.mmap(self.fd, size)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.allocator = RingAllocator(size)
        self.pinned = False

    def view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        return ring_view(self.tensor, offset, dtype, shape)

    def pin(self) -> None:
        """Page-lock the ring for async device->host DMA (once)."""
        if not self.pinned:
            pin_host(self.tensor)
            self.pinned = True


def pin_host(mapped: torch.Tensor) -> None:
    """Page-lock a host mapping (``cudaHostRegister``) so copies to and from it are async DMAs."""
    rc = torch.cuda.cudart().cudaHostRegister(mapped.data_ptr(), mapped.numel() * mapped.element_size(), 0)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({rc})")


def ring_view(ring: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` stored at ``offset`` of a uint8 ring (both sides use it)."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return ring[offset:offset + nbytes].view(dtype).view(shape)


def attach_ring(fd: int, size: int) -> torch.Tensor:
    """Sidecar side: map the ring passed by fd."""
    return torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)
