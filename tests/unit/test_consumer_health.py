"""/healthz: 200 while the loop turns and the work in hand is being tried; 503 when either stops."""

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


def test_a_batch_nobody_tries_any_more_turns_health_503():
    m = ConsumerMetrics()
    with MetricsServer(m, 0, "127.0.0.1", stale_after_s=60, stall_after_s=0.5) as server:
        assert healthz(server.port)[0] == 200  # idle is healthy
        m.work_since = time.monotonic()  # a batch in work...
        m.trying()
        assert healthz(server.port)[0] == 200
        time.sleep(0.7)
        m.beat()  # ...the loop still turns, but no call has been started for it since (a wedged writer)
        status, detail = healthz(server.port)
        assert status == 503 and detail["since_last_try_s"] >= 0.5 and detail["uncommitted_work_age_s"] >= 0.5
        m.work_since = None  # committed
        assert healthz(server.port)[0] == 200


def test_a_batch_retried_through_an_outage_stays_healthy():
    """A restart would not bring the store back: the outage shows in the work's age, not as a failed probe."""
    m = ConsumerMetrics()
    with MetricsServer(m, 0, "127.0.0.1", stale_after_s=60, stall_after_s=0.5) as server:
        m.work_since = time.monotonic()
        for _ in range(5):  # the writer's retries, closer together than stall_after_s
            time.sleep(0.25)
            m.beat()
            m.trying()
            status, detail = healthz(server.port)
            assert status == 200, detail
        assert detail["uncommitted_work_age_s"] >= 1.0 and detail["since_last_try_s"] < 0.5
        m.trying(due_in=1.0)  # a backoff longer than stall_after_s: the next try is due, not missed
        time.sleep(0.7)
        m.beat()
        assert healthz(server.port)[0] == 200
        time.sleep(0.9)  # ...and once it is overdue by stall_after_s, no try came: 503
        m.beat()
        assert healthz(server.port)[0] == 503


def test_a_wedged_loop_turns_health_503():
    m = ConsumerMetrics()
    with MetricsServer(m, 0, "127.0.0.1", stale_after_s=0.3) as server:
        time.sleep(0.5)
        assert healthz(server.port)[0] == 503
        m.beat()
        assert healthz(server.port)[0] == 200


def test_the_outage_shows_in_the_metrics_alerts_read():
    """What the README's consumer alerts select: the age of the work in hand, and every dead-letter reason
    and error kind from the start (a labelled series that first appears at 1 is missed by increase())."""
    from prometheus_client.parser import text_string_to_metric_families

    from consumers.errors import POISON_KINDS, TRANSIENT_KINDS

    m = ConsumerMetrics()

    def samples():
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    age = ("vllm_mm_events_consumer_uncommitted_work_age_seconds", ())
    assert samples()[age] == 0.0  # idle
    m.work_since = time.monotonic() - 42
    assert 42 <= samples()[age] < 60
    got = samples()
    for reason in POISON_KINDS:
        assert got[("vllm_mm_events_consumer_dead_lettered_total", (("reason", reason),))] == 0.0
    for kind in TRANSIENT_KINDS:
        assert got[("vllm_mm_events_consumer_errors_total", (("kind", kind),))] == 0.0
