"""Cost of loading a fetched stored embedding onto the GPU inside a step (``reuse_stored_embeddings``).

    python benchmarks/load_gpu.py [--json]      # needs a CUDA GPU and PyTorch only

The fetch sidecar writes each checked tensor's raw bytes into a region of the staging ring (a file
on tmpfs the worker maps, page-locked once); in the step that needs it, the worker's
``publisher.vllm.capture.HostToDeviceLoad`` starts an async DMA from that region on the step's
stream. Compared, per call and per MB, at realistic sizes (bf16):

- ``.to(cuda)``: a plain ``t.to("cuda")`` of a tensor already in (pageable) host memory: the
  transfer alone, what loading costs at best with no file at all;
- ``read + .to(cuda)``: ``torch.from_file`` then ``.to("cuda")``, the simple way from the file;
- ``pinned .to(cuda)``: ``.to("cuda", non_blocking=True)`` of a tensor already in page-locked memory:
  the DMA alone, the floor for any path;
- ``publisher``: ``HostToDeviceLoad.load`` from the ring (async DMA).

Host ms is what the step's thread spends in the call; done ms is until the data is on the device
(``synchronize``). Every loaded tensor is checked equal to its source.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from publisher.vllm.capture import HostToDeviceLoad  # noqa: E402

SIZES = [(576, 4096, "LLaVA-1.5-7B image"), (1296, 3584, "Qwen2-VL-7B image"), (2500, 3584, "large Qwen-VL image")]


def timed(fn, reps: int) -> tuple[float, float]:
    """Median host ms per call, median ms until the copy has landed."""
    host, done = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        done.append((t2 - t0) * 1e3)
        del out
    return statistics.median(host), statistics.median(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    loader = HostToDeviceLoad()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    rows = []
    with tempfile.TemporaryDirectory(dir=base) as d:
        ring = os.path.join(d, "ring")
        ring_size = 64 << 20
        with open(ring, "wb") as f:
            f.truncate(ring_size)
        for n, hidden, what in SIZES:
            src = torch.randn(n, hidden).to(torch.bfloat16)
            raw = src.view(torch.uint16).numpy().tobytes()
            path = os.path.join(d, f"{n}x{hidden}.bin")
            Path(path).write_bytes(raw)
            with open(ring, "r+b") as f:  # as the fetch sidecar leaves it, at offset 4096
                f.seek(4096)
                f.write(raw)
            loader.attach(ring, ring_size, dev)
            mb = src.numel() * 2 / 1e6
            assert torch.equal(loader.load(4096, "bfloat16", (n, hidden), dev, torch.bfloat16).cpu(), src)
            assert torch.equal(torch.from_file(path, size=n * hidden, dtype=torch.bfloat16).view(n, hidden), src)
            pinned = src.pin_memory()
            cases = {
                ".to(cuda)": lambda: src.to(dev),
                "pinned .to(cuda)": lambda: pinned.to(dev, non_blocking=True),
                "read + .to(cuda)": lambda: torch.from_file(path, size=n * hidden, dtype=torch.bfloat16)
                .view(n, hidden).to(dev),
                "publisher": lambda: loader.load(4096, "bfloat16", (n, hidden), dev, torch.bfloat16),
            }
            for _ in range(5):  # warm the allocators
                for fn in cases.values():
                    fn()
            base_host, base_done = timed(cases[".to(cuda)"], args.reps)
            for name, fn in cases.items():
                host, done = (base_host, base_done) if name == ".to(cuda)" else timed(fn, args.reps)
                rows.append({"size": f"{n}x{hidden} ({what})", "mb": round(mb, 2), "path": name,
                             "host_ms": round(host, 3), "done_ms": round(done, 3),
                             "host_ms_per_mb": round(host / mb, 4), "done_ms_per_mb": round(done / mb, 4),
                             "done_vs_plain_to": round(done / base_done, 2)})
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(dev), "rows": rows}))
        return
    print(f"device: {torch.cuda.get_device_name(dev)}, bf16, median of {args.reps}\n")
    print("| size | MB | path | host ms | done ms | host ms/MB | done ms/MB | done vs .to(cuda) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['mb']} | {r['path']} | {r['host_ms']} | {r['done_ms']} | {r['host_ms_per_mb']} "
              f"| {r['done_ms_per_mb']} | {r['done_vs_plain_to']} |")


if __name__ == "__main__":
    main()
