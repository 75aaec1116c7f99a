import random

import torch

from publisher.sidecar.ring import ALIGN, RingAllocator, SharedRing, attach_ring
from publisher.vllm.capture import DeviceToHostCapture


def test_ring_never_overlaps_and_reclaims_out_of_order():
    rng = random.Random(3)
    ring = RingAllocator(1 << 16)
    live: dict[int, int] = {}
    for _ in range(20000):
        if live and (rng.random() < 0.5 or len(live) > 40):
            off = rng.choice(list(live))
            ring.free(off)
            del live[off]
            continue
        n = rng.choice([1, 100, 4096, 9000, 30000])
        off = ring.alloc(n)
        if off is None:
            assert live, "an empty ring must always fit an item no larger than itself"
            continue
        assert off % ALIGN == 0 and off + n <= ring.size
        for o, m in live.items():
            assert off + n <= o or o + m <= off, "regions overlap"
        live[off] = n
    for off in list(live):
        ring.free(off)
    assert ring.used == 0 and ring.alloc(1 << 16) == 0


def test_ring_full_then_freed():
    ring = RingAllocator(4 * ALIGN)
    offs = [ring.alloc(ALIGN) for _ in range(4)]
    assert offs == [0, ALIGN, 2 * ALIGN, 3 * ALIGN] and ring.alloc(1) is None
    ring.free(offs[1])  # not the oldest: nothing reclaimed yet
    assert ring.alloc(1) is None
    ring.free(offs[0])
    assert ring.alloc(2 * ALIGN) == 0  # wraps into the reclaimed front
    assert ring.alloc(ALIGN * 5) is None  # larger than the ring


def test_shared_ring_is_visible_through_its_fd():
    ring = SharedRing(1 << 20)
    seen = []
    cap = DeviceToHostCapture(ring, seen.extend)
    t = torch.randn(16, 128, dtype=torch.bfloat16)
    off = ring.allocator.alloc(t.numel() * t.element_size())
    cap.capture(t, off, ("item", off))
    assert seen == [("item", off)]  # on CPU the copy is done when capture returns
    other = attach_ring(ring.fd, ring.size)  # what the sidecar maps
    got = other[off:off + t.numel() * 2].view(torch.bfloat16).view(16, 128)
    assert torch.equal(got, t)
    t.add_(1)  # the engine may reuse its tensor: the ring holds a copy
    assert not torch.equal(got, t)
