"""``reuse_stored_embeddings``: load an item's stored encoder output instead of running the encoder.

vLLM 0.32's encoder-cache connector API has the read half, with two constraints this design follows:

- ``has_cache_item`` runs on the scheduler loop and must be honest: once it says True, vLLM skips the
  encoder and the worker must put the tensor into its encoder cache in that very step, or the
  engine fails. So it answers True only for items whose checked bytes are already in host memory.
- The one early, non-blocking hook is ``ensure_cache_available``: returning False defers a waiting
  request to a later step. A new request's items are looked up then (``Fetch`` to the fetch sidecar,
  which GETs and checks the object and writes the tensor into a region of the staging ring the
  scheduler allocated); the request waits at most ``reuse_wait_ms``, then whatever is not resident
  is encoded as usual.

Scheduler half: ``StoredItemIndex`` (in-memory state, no I/O on the loop but non-blocking socket
reads and sends). Worker half: ``load_stored`` copies the tensor from the ring in the step it is needed.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from publisher.vllm.capture import HostToDeviceLoad

log = logging.getLogger("vllm_mm_events.reuse")

PIN_S = 60.0  # a fetched tensor handed to the worker (or promised by has_cache_item) is kept this long
MISS_S = 5.0  # an absent object is looked up again after this long (another replica may be storing it)
STORE_DOWN_S = 5.0  # after a failed lookup (store away, timeout), no new lookups for this long: no waits either
REJECT_S = 300.0  # a refused object: not fetched again for this long


def input_digest(feature) -> str | None:
    """A digest of an item's processed input (every tensor vLLM hands the encoder for it, by name):
    equal digests mean the same pixels / samples after the same preprocessing. None without data."""
    import blake3
    import torch

    data = feature.data
    if not data:
        return None
    tensors = []
    for name, elem in sorted(data.items()):
        value = getattr(elem, "data", None)
        if not isinstance(value, torch.Tensor):
            return None  # nested inputs, or handles into vLLM's shm processor cache: no digest, never reused
        tensors.append((name, value.detach().cpu().contiguous().reshape(-1)))  # 0-d fields too (reshape)
    # On the scheduler loop (once per item, only with reuse on): ~0.2 ms for a LLaVA-1.5 image's 1.4 MB
    # of pixels on one core; past 1 MiB blake3 may use more cores to keep it short.
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if total >= 1 << 20 else 1)
    for name, t in tensors:
        h.update(f"{name}|{t.dtype}|{tuple(data[name].data.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return "blake3:" + h.hexdigest()


@dataclass
class Resident:
    offset: int  # in the staging ring
    shape: tuple[int, ...]
    digest: str  # of the input it was checked against: promised only to requests with that input
    pinned_until: float = 0.0


class StoredItemIndex:
    """Scheduler half: which items' checked stored tensors are in the staging ring, and which are on
    the way. It owns the ring's space: a region per fetch, freed on a miss or when evicted (oldest
    first, never while promised to vLLM).

    ``send(msg)`` reaches the fetch sidecar; ``receive()`` returns its answers (non-blocking)."""

    def __init__(self, send, receive, *, wait_s: float, ring_size: int, hidden_size: int, storage_dtype: str):
        from publisher.sidecar.ring import SpanAllocator
        from schemas.objects import DTYPES

        self.send, self.receive = send, receive
        self.wait_s = wait_s
        self.ring = SpanAllocator(ring_size)
        self.row_bytes = hidden_size * DTYPES[storage_dtype][1].itemsize
        self.hidden_size, self.storage_dtype = hidden_size, storage_dtype
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # in allocation order
        self.fetching: dict[str, tuple[int, int, str]] = {}  # mm_hash -> (ring offset, rows, input digest)
        self.retry_at: dict[str, float] = {}  # mm_hash -> no lookup before (absent, refused, failed)
        self.store_down_until = 0.0
        self.lost = False  # the fetch sidecar is gone: no more lookups
        self.local: set[str] = set()  # in vLLM's own encoder cache (allocated, not yet freed)
        # request id -> {mm_hash: digest of that request's own input}: never shared across requests, as a
        # client-chosen id may name other pixels in another request
        self._digests: dict[str, dict[str, str | None]] = {}
        self._draining: list[tuple[float, int]] = []  # (until, ring offset): dropped, maybe still loading
        self._deadline: dict[str, float] = {}  # request id -> when it stops waiting
        self._settled: set[str] = set()  # request ids past their wait
        self._items: dict[str, list] = {}  # request id -> its items the encoder would run on (fixed per request)

    def digest(self, request_id: str, feature) -> str | None:
        mine = self._digests.setdefault(request_id, {})
        h = feature.identifier
        if h not in mine:
            try:
                mine[h] = input_digest(feature)
            except Exception as e:  # noqa: BLE001 - an input of a shape not seen here: encode it, never crash
                log.warning("mm-events: no input digest for %s (%s: %s); it is encoded, never reused",
                            h, type(e).__name__, e)
                mine[h] = None
            if mine[h] is None and feature.data:
                _warn_once_no_digest()
        return mine[h]

    def ready(self, request, num_computed_tokens: int, key_for, encoded_items) -> bool:
        """``ensure_cache_available``: False while a new request's items are being fetched (within the wait)."""
        rid = request.request_id
        settled = rid in self._settled
        if settled and not self.resident:
            return True
        if not settled:
            self.poll()
        now = time.monotonic()
        pending = False
        items = self._items.get(rid)
        if items is None:  # once per request, not on every step it runs
            items = self._items[rid] = encoded_items(request)
        for f in items:
            h, pos = f.identifier, f.mm_position
            if pos.offset + pos.length <= num_computed_tokens or h in self.local:
                continue
            r = self.resident.get(h)
            if r is not None:
                if r.digest == self.digest(rid, f) and r.shape[0] == pos.get_num_embeds():
                    continue
                # Checked against another request's input under the same id: has() must not promise it to
                # this one. Its region stays untouched while a promise to the other may still be loading.
                del self.resident[h]
                self._release(r, now)
            if settled:
                continue
            if h in self.fetching:
                pending = True
            elif not self.lost and self.retry_at.get(h, 0.0) <= now and self.store_down_until <= now:
                pending |= self._fetch(rid, h, f, key_for(h), pos.get_num_embeds(), now)
        deadline = self._deadline.setdefault(rid, now + self.wait_s)
        if pending and now < deadline:
            return False
        self._settled.add(rid)
        self._deadline.pop(rid, None)
        return True

    def _fetch(self, rid: str, h: str, feature, key: str, rows: int, now: float) -> bool:
        digest = self.digest(rid, feature)
        if digest is None:
            return False
        offset = self._alloc(rows * self.row_bytes, now)
        if offset is None:
            return False  # the ring is full of promised items: this one is encoded
        from publisher.sidecar.messages import Fetch

        if not self.send(Fetch(key, h, digest, rows, offset)):
            self.ring.free(offset)
            return False
        self.fetching[h] = (offset, rows, digest)
        return True

    def _release(self, r: Resident, now: float) -> None:
        if r.pinned_until > now:
            self._draining.append((r.pinned_until, r.offset))
        else:
            self.ring.free(r.offset)

    def _alloc(self, nbytes: int, now: float) -> int | None:
        """A ring region, evicting the oldest resident items that are not promised while needed."""
        if nbytes > self.ring.size:
            return None
        while (offset := self.ring.alloc(nbytes)) is None:
            victim = next((h for h, r in self.resident.items() if r.pinned_until <= now), None)
            if victim is None:
                return None
            self.ring.free(self.resident.pop(victim).offset)
        return offset

    def has(self, mm_hash: str) -> bool:
        """``has_cache_item``: True only for a resident item, which is then kept past its load."""
        r = self.resident.get(mm_hash)
        if r is None:
            return False
        r.pinned_until = time.monotonic() + PIN_S
        return True

    def take_loads(self, allocated: list[tuple[str, int, str]], scheduler_output) -> tuple[dict, dict[str, set]]:
        """``build_connector_meta``: of the items allocated this step, those vLLM will not encode are
        ours to load. Returns ({mm_hash: (ring offset, stored dtype, shape)}, {request id: loaded mm_hashes})."""
        encoded = scheduler_output.scheduled_encoder_inputs
        loads, by_request = {}, {}
        for rid, index, h in allocated:
            self.local.add(h)
            if index in encoded.get(rid, ()):
                continue
            r = self.resident.get(h)
            if r is None:  # cannot happen while has() pins; vLLM would fail the step without the tensor
                log.error("mm-events: item %s was promised for loading but is no longer resident", h)
                continue
            r.pinned_until = time.monotonic() + PIN_S
            loads[h] = (r.offset, self.storage_dtype, r.shape)
            by_request.setdefault(rid, set()).add(h)
        for h in scheduler_output.free_encoder_mm_hashes:
            self.local.discard(h)
        if loads:
            from publisher.sidecar.messages import Reused

            self.send(Reused(len(loads)))
        return loads, by_request

    def forget(self, request_id: str) -> None:
        self._settled.discard(request_id)
        self._items.pop(request_id, None)
        self._deadline.pop(request_id, None)
        self._digests.pop(request_id, None)

    def poll(self) -> None:
        """Apply the fetch sidecar's answers (never waits)."""
        now = time.monotonic()
        if self._draining:
            for _, offset in (d for d in self._draining if d[0] <= now):
                self.ring.free(offset)
            self._draining = [d for d in self._draining if d[0] > now]
        for msg in self.receive():
            offset, rows, digest = self.fetching.pop(msg.mm_hash, (None, 0, ""))
            if offset is None:
                continue
            if msg.outcome == "hit" and msg.mm_hash not in self.resident:
                self.resident[msg.mm_hash] = Resident(offset, (rows, self.hidden_size), digest)
            else:
                self.ring.free(offset)
                if msg.outcome != "hit":
                    self.retry_at[msg.mm_hash] = now + (REJECT_S if msg.outcome == "rejected" else MISS_S)
                if msg.outcome == "error":  # the store is away: stop asking (and waiting) for a while
                    self.store_down_until = now + STORE_DOWN_S
                if len(self.retry_at) > 65536:
                    self.retry_at = {h: t for h, t in self.retry_at.items() if t > now}

    def lost_sidecar(self) -> None:
        """The fetch sidecar is gone: nothing more will land; what is resident stays loadable."""
        for offset, _, _ in self.fetching.values():
            self.ring.free(offset)
        self.fetching.clear()
        self.lost = True  # no more lookups: every item is encoded


_warned: list[bool] = []


def _warn_once_no_digest() -> None:
    if not _warned:
        _warned.append(True)
        log.warning("mm-events: items carry inputs this publisher cannot digest (nested inputs, or vLLM's shm "
                    "processor cache, mm_processor_cache_type=shm, which hands the scheduler handles): such "
                    "items are encoded, never reused, and stored without their extra tensors")


# ---- worker half --------------------------------------------------------------------------------

def load_stored(encoder_cache: dict[str, "torch.Tensor"], loads: dict[str, tuple[int, str, tuple[int, ...]]],
                device: "torch.device", dtype: "torch.dtype", loader: "HostToDeviceLoad") -> int:
    """``start_load_caches``: put each fetched tensor into vLLM's encoder cache, as the encoder would
    have (its device, its dtype). Returns the number loaded."""
    n = 0
    for mm_hash, (offset, stored_dtype, shape) in loads.items():
        if mm_hash in encoder_cache:
            continue
        encoder_cache[mm_hash] = loader.load(offset, stored_dtype, shape, device, dtype)
        n += 1
    return n
