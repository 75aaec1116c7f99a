"""Prometheus metrics and a liveness endpoint, on one small HTTP server.

``/metrics``: the counters below. ``/healthz``: 200 while the consume loop has turned
within ``stale_after_s`` and the work in hand is being tried (a wedged consumer gets restarted
by Kubernetes), else 503.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from consumers.errors import POISON_KINDS, TRANSIENT_KINDS

NS = "vllm_mm_events_consumer"


class ConsumerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.consumed = Counter(f"{NS}_events_consumed", "Events read from the source.", registry=r)
        self.indexed = Counter(f"{NS}_points_indexed", "Points upserted, by sink.", ["sink"], registry=r)
        self.dead_lettered = Counter(f"{NS}_dead_lettered", "Records sent to the dead-letter queue, by reason.",
                                     ["reason"], registry=r)
        self.errors = Counter(f"{NS}_errors", "Retried failures, by kind (object_store, sink, dlq, source).",
                              ["kind"], registry=r)
        self.missing = Counter(f"{NS}_embeddings_missing", "Items the publisher reported missing in events.",
                               registry=r)
        self.batch_seconds = Histogram(f"{NS}_batch_seconds", "From a batch's first record to its commit.",
                                       buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.batch_records = Histogram(f"{NS}_batch_records", "Records per committed batch.",
                                       buckets=(1, 4, 16, 64, 256, 1024, 4096), registry=r)
        self.lag = Gauge(f"{NS}_lag_events", "Events not yet consumed on the assigned partitions.", registry=r)
        self.last_commit = Gauge(f"{NS}_last_commit_timestamp_seconds", "When offsets were last committed.",
                                 registry=r)
        self.work_age = Gauge(f"{NS}_uncommitted_work_age_seconds",
                              "How long the oldest uncommitted batch has been in work (0: idle); it grows through "
                              "a sink, store or registry outage.", registry=r)
        self.work_age.set_function(self._work_age)
        # Every label value exists from the start at 0, so that increase() sees the first occurrence.
        for reason in POISON_KINDS:
            self.dead_lettered.labels(reason)
        for kind in TRANSIENT_KINDS:
            self.errors.labels(kind)
        self.heartbeat = time.monotonic()
        self.work_since: float | None = None  # when the oldest uncommitted batch began (None: idle)
        self.tried_at = 0.0  # when a writer or fetch thread last started a call to a store, sink or registry

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def _work_age(self) -> float:
        since = self.work_since
        return 0.0 if since is None else time.monotonic() - since

    def trying(self, due_in: float = 0.0) -> None:
        """A call is being started, or (``due_in`` > 0) one is due after that backoff."""
        self.tried_at = time.monotonic() + due_in

    def health(self, stale_after_s: float, stall_after_s: float) -> tuple[bool, dict]:
        """Healthy while the loop turns and the work in hand is being tried: a call started within
        ``stall_after_s`` (every client has a limit well below it). A consumer retrying through a sink
        or store outage is healthy: restarting it would not bring the store back, and would make it
        wait out the restart back-off once the store returns. The outage shows in ``errors`` and in
        ``uncommitted_work_age_seconds``, what to alert on."""
        now, since = time.monotonic(), self.work_since  # read once: the consume loop sets it meanwhile
        age = now - self.heartbeat
        stalled = 0.0 if since is None else now - since
        untried = 0.0 if since is None else max(0.0, now - max(since, self.tried_at))
        ok = age < stale_after_s and untried < stall_after_s
        return ok, {"loop_age_s": round(age, 1), "uncommitted_work_age_s": round(stalled, 1),
                    "since_last_try_s": round(untried, 1)}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    def __init__(self, metrics: ConsumerMetrics, port: int, host: str = "0.0.0.0", stale_after_s: float = 120.0,
                 stall_after_s: float = 300.0):
        m = metrics

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # an idle or slow client cannot hold a thread
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.startswith("/metrics"):
                    body, status, ctype = m.render(), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/healthz"):
                    ok, detail = m.health(stale_after_s, stall_after_s)
                    status = 200 if ok else 503
                    body, ctype = json.dumps(detail).encode(), "application/json"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds would flood the log
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="mm-events-metrics", daemon=True)
        self.thread.start()
        logging.getLogger("vllm_mm_events.consumer").info("metrics on %s:%d (/metrics, /healthz)", host, self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
