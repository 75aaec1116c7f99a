"""The connector's worker half with its real sidecar and the embedded store (a local directory), its
hooks called as vLLM calls them.

- vLLM kills a worker whose teardown outlasts its shutdown budget (SIGKILL), and the connector's report
  dies with it. Its sidecar (detached, so never killed with it) stores what it was given and reports in
  its place, with the worker's own totals: encoder runs, loads, drops.
- An item the encoder runs again is not stored again, for a while: an object deleted since (a lifecycle
  rule) is stored again at a later run."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from worker_half import encoder_step, worker_half

from publisher.vllm import connector

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, "tests/support")
    import torch
    from worker_half import encoder_step, worker_half

    worker = worker_half({"object_store": sys.argv[1]})
    for seeds in [(1, 2), (3,), (1,)]:  # image 1 twice: its second run is not stored again
        encoder_step(worker, {f"{s:064x}": torch.full((4, 8), float(s)) for s in seeds})
    worker.loads += 2  # as start_load_caches counts items loaded from the store (reuse_stored_embeddings)
    encoder_step(worker, {})
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


def test_an_item_encoded_again_is_stored_again_once_its_hand_over_is_old(tmp_path):
    """Within KNOWN_FOR_S of its hand-over, an item's next encoder run is not stored (its object is there or
    on its way); after it, it is, so an object deleted meanwhile is back. Before, the worker skipped the
    item for its lifetime, and every later event listed the object missing."""
    store = tmp_path / "store"
    worker = worker_half({"object_store": f"file://{store}"})
    mm_hash = "ab" * 32
    cache = {mm_hash: torch.randn(16, 32)}
    key = worker.key_for(mm_hash)

    def run_encoder() -> None:  # one step in which the encoder ran for the item
        encoder_step(worker, cache)

    def stored(within: float) -> bool:
        deadline = time.monotonic() + within
        while not list(store.rglob("*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(list(store.rglob("*.safetensors")))

    try:
        run_encoder()
        assert stored(within=10)
        for f in store.rglob("*.safetensors"):  # the lifecycle rule
            f.unlink()
        run_encoder()  # handed over just now: taken as stored, not stored again
        assert not stored(within=1)
        worker._known[key] -= connector.KNOWN_FOR_S  # its hand-over KNOWN_FOR_S older
        run_encoder()
        assert stored(within=10)
    finally:
        report = worker.sidecar.close(10)
    assert worker.saves == 3 and report["uploaded"] == 2, report
