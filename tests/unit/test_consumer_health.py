"""/healthz: 200 while the loop turns and work in hand gets committed; 503 when either stops."""

import json
import time
import urllib.error
import urllib.request

from consumers.metrics import ConsumerMetrics, MetricsServer


def healthz(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_batch_that_is_never_committed_turns_health_503():
    m = ConsumerMetrics()
    with MetricsServer(m, 0, "127.0.0.1", stale_after_s=60, stall_after_s=0.5) as server:
        assert healthz(server.port)[0] == 200  # idle is healthy
        m.work_since = time.monotonic()  # a batch in work...
        assert healthz(server.port)[0] == 200
        time.sleep(0.7)
        m.beat()  # ...the loop still turns, but nothing gets committed
        status, detail = healthz(server.port)
        assert status == 503 and detail["uncommitted_work_age_s"] >= 0.5
        m.work_since = None  # committed
        assert healthz(server.port)[0] == 200


def test_a_wedged_loop_turns_health_503():
    m = ConsumerMetrics()
    with MetricsServer(m, 0, "127.0.0.1", stale_after_s=0.3) as server:
        time.sleep(0.5)
        assert healthz(server.port)[0] == 503
        m.beat()
        assert healthz(server.port)[0] == 200
