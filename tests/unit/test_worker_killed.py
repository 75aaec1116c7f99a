"""vLLM kills a worker whose teardown outlasts its shutdown budget (SIGKILL), and the connector's
report dies with it. Its sidecar (detached, so never killed with it) stores what it was given and
reports in its place, with the worker's own totals: encoder runs, loads, drops.

The worker half here is the connector's, with its real sidecar and the embedded store (a local
directory); its process SIGKILLs itself after a few engine steps, as vLLM's process manager does."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from publisher.config import PublisherConfig
    from publisher.vllm.connector import MMEmbeddingPublisher
    from schemas.uris import StoreLocation

    store = sys.argv[1]
    worker = object.__new__(MMEmbeddingPublisher)  # the worker half as vLLM builds it, minus vLLM's config
    worker.config = PublisherConfig.load({"object_store": store}, environ={}).resolved(torch.float32)
    worker.model, worker._keys, worker._connector_metadata = "m", {}, None
    worker.location = StoreLocation.parse(worker.config.object_store)
    worker._init_worker()
    for step, seeds in enumerate([(1, 2), (3,), (1,)]):  # image 1 twice: its second run is not stored again
        cache = {f"{s:064x}": torch.full((4, 8), float(s)) for s in seeds}
        worker.start_save_caches(cache)
        for mm_hash in cache:
            worker.save_caches(cache, mm_hash)
        worker.get_finished(set())
    worker.loads += 2  # as start_load_caches counts items loaded from the store (reuse_stored_embeddings)
    worker.start_save_caches({})
    worker.get_finished(set())
    print("steps done", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # before the connector's shutdown, as vLLM does past its budget
""")


def test_a_killed_workers_sidecar_stores_its_items_and_reports_in_its_place(tmp_path):
    store = tmp_path / "store"
    p = subprocess.Popen([sys.executable, "-c", WORKER, f"file://{store}"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    # The sidecar inherited the output: it is complete once the sidecar has exited too.
    out, _ = p.communicate(timeout=120)
    assert p.returncode == -9 and "steps done" in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if "mm-events worker sidecar stopped after its engine" in ln]
    assert len(lines) == 1, out[-3000:]
    m = re.search(r"saves=(\d+) loads=(\d+) (\{.*\}), dropped=(\d+)", lines[0])
    assert m and (m[1], m[2], m[4]) == ("4", "2", "0"), lines[0]
    assert "'uploaded': 3" in m[3] and "'not_uploaded': 0" in m[3] and "'upload_failed': 0" in m[3], lines[0]
    deadline = time.monotonic() + 5
    stored = sorted(f.name for f in store.rglob("*.safetensors"))
    while len(stored) < 3 and time.monotonic() < deadline:  # written before the report; listed here
        time.sleep(0.1)
        stored = sorted(f.name for f in store.rglob("*.safetensors"))
    assert len(stored) == 3, stored
