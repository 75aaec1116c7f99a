"""Cost of capturing encoder outputs inside a GPU step: none vs ``.cpu()`` vs the publisher's capture.

    python benchmarks/capture_gpu.py            # needs a CUDA GPU and PyTorch only

A loop of bf16 matmuls stands in for the model step; after each step an "encoder output"
produced by the step is captured to host memory:

- ``none``: no capture (the ceiling);
- ``cpu()``: a synchronous ``t.cpu()``, as the original design did;
- ``publisher``: ``publisher.vllm.capture.DeviceToHostCapture`` into the shared, page-locked
  ring (side stream, stream-ordered async copy, ``record_stream``; landed copies are
  noticed by polling their events and handed on; regions are freed as the sidecar would).

Prints steps/s, the ratio to ``none``, the host time spent in the capture call, and checks
that every captured tensor equals its source.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from publisher.sidecar.ring import SharedRing
from publisher.vllm.capture import DeviceToHostCapture  # noqa: E402


def run(method: str, n: int, shape: tuple[int, int], steps: int, ring_bytes: int) -> dict:
    dev = torch.device("cuda")
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ready: queue.SimpleQueue = queue.SimpleQueue()
    ring = SharedRing(ring_bytes) if method == "publisher" else None
    cap = DeviceToHostCapture(ring, lambda landed: [ready.put(m) for m in landed]) if ring else None
    checks = []
    refs: dict[int, tuple] = {}
    host_ns = 0

    def drain(block: bool) -> None:
        """The sidecar's part: read landed copies (checking some), then free their regions."""
        while True:
            try:
                _, off, i = ready.get() if block else ready.get_nowait()
            except queue.Empty:
                return
            block = False
            if i in refs:
                ref, dtype, shp = refs.pop(i)
                checks.append((ref, ring.view(off, dtype, shp).clone()))
            ring.allocator.free(off)

    def step(i: int):
        nonlocal host_ns
        c = a @ b  # the "model step"
        out = (c[: shape[0], : shape[1]] * (1.0 + i % 7)).contiguous()  # an output the step produced
        t0 = time.perf_counter_ns()
        if method == "cpu()":
            host = out.cpu()
            if i % 50 == 0:
                checks.append((out, host))
        elif method == "publisher":
            drain(block=False)
            nbytes = out.numel() * out.element_size()
            off = ring.allocator.alloc(nbytes)
            while off is None:  # ring full: wait for a copy to land (the "block" policy)
                if not cap.wait_one():
                    drain(block=True)
                else:
                    drain(block=False)
                off = ring.allocator.alloc(nbytes)
            if i % 50 == 0:
                refs[i] = (out.clone(), out.dtype, tuple(out.shape))
            cap.capture(out, off, ("item", off, i))
        host_ns += time.perf_counter_ns() - t0

    for i in range(20):  # warm-up
        step(i)
    torch.cuda.synchronize()
    host_ns = 0
    checks.clear()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if method == "publisher":  # collect the last copies before checking them
        time.sleep(0.1)
        drain(block=False)
    ok = bool(checks) and all(torch.equal(ref.cpu(), host) for ref, host in checks) if method != "none" else True
    return {"steps_per_s": steps / dt, "host_us": host_ns / steps / 1e3, "equal": ok}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}")
    cases = [((576, 4096), 8192), ((576, 4096), 4096), ((2500, 3584), 8192), ((2500, 3584), 4096)]
    print(f"{'output (bf16)':>14s} {'matmul n':>8s} {'method':>10s} {'steps/s':>9s} {'vs none':>8s} "
          f"{'host us/step':>12s} {'equal':>6s}")
    for shape, n in cases:
        base = None
        for method in ("none", "cpu()", "publisher"):
            r = run(method, n, shape, args.steps, ring_bytes=256 << 20)
            base = base or r["steps_per_s"]
            print(f"{shape[0]:>6d}x{shape[1]:<7d} {n:8d} {method:>10s} {r['steps_per_s']:9.0f} "
                  f"{r['steps_per_s'] / base:8.2f} {r['host_us']:12.1f} {str(r['equal']):>6s}", flush=True)


if __name__ == "__main__":
    main()
