"""A broker that never answers: the drop policy keeps the engine serving, and shutdown reports
what was dropped and what could not be delivered, in bounded time."""

import re
import time

import pytest

from pipeline import run_driver, stats_line

pytestmark = pytest.mark.e2e


def test_drop_policy_with_a_dead_broker(tmp_path, tiny_llava):
    extra = {"object_store": (tmp_path / "objects").as_uri(),
             "event_sink": "kafka://127.0.0.1:1/never",  # nothing listens there
             "kafka": {"message.timeout.ms": 1000}, "backpressure": "drop", "max_pending_events": 2,
             "shutdown_timeout_s": 3, "spool_dir": str(tmp_path / "spool")}
    batches = [[{"images": [100 + i]} for i in range(6)]]
    t0 = time.monotonic()
    results, log = run_driver({"model": str(tiny_llava), "extra_config": extra, "batches": batches}, tmp_path)
    assert len(results) == 6 and all(r["num_tensors"] == 1 for r in results)  # served, objects stored
    sched = stats_line(log, "scheduler")
    assert re.search(r"'accepted': 2\b", sched) and re.search(r"'dropped': 4\b", sched), sched
    assert "'published': 0" in sched, sched
    failed = int(re.search(r"'failed': (\d+)", sched).group(1))
    undelivered = int(re.search(r"'undelivered': (\d+)", sched).group(1))
    assert failed + undelivered == 2, sched  # every accepted event is accounted for
    assert "dropped the event of" in log and "delivery failed" in log
    assert "stay in the outbox" in log  # undelivered, but kept for the next start
    assert time.monotonic() - t0 < 240
