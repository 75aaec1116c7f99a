"""The publisher's Prometheus metrics, from every sidecar of a host on one port.

The sidecars are separate processes (a scheduler sidecar per engine, a worker sidecar per
storing worker), so the metrics use prometheus_client's multiprocess mode: each sidecar
writes its values to memory-mapped files in one directory, keyed by ``metrics_port``, and
the first sidecar to bind the port serves ``/metrics`` with all of them summed (the
others only write). Counters of a sidecar that exited are dropped when a scheduler
sidecar starts, so a restart shows as a counter reset, which Prometheus handles.

A sidecar's files are named by its pid *and* its start time: the directory outlives the
processes (in the chart it is on the pod's ``/tmp`` emptyDir, kept across container restarts),
and a restarted container numbers its processes from 1 again. Named by pid alone, a file of a
killed sidecar whose pid a new process now holds was kept, and read back: its gauges (events
in flight, spool bytes) stayed in the sum for good, and a new sidecar at that pid counted on
from the dead one's values.

``COUNTERS`` maps the sidecars' report counters (``DispatcherStats``, ``UploaderStats``)
to metric names: a report and a scrape always count the same things.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("vllm_mm_events.metrics")
NS = "vllm_mm_events_publisher"

# report counter -> (metric name without the namespace, help)
COUNTERS: dict[str, tuple[str, str]] = {
    # scheduler sidecar
    "accepted": ("requests_finished", "Finished requests handed to the publisher (spooled first)."),
    "published": ("events_published", "Events the sink acknowledged."),
    "incomplete": ("events_incomplete", "Events published with missing_embeddings (objects not durable in time)."),
    "failed": ("events_failed", "Events the sink could not take (permanent, e.g. a record too large)."),
    "dropped": ("events_dropped", "Events dropped in the engine under backpressure=drop."),
    "store_errors": ("store_check_errors", "Failed object-store checks (retried), and objects at a publisher key "
                                           "whose metadata is not the publisher's (never named)."),
    "replayed": ("events_replayed", "Events replayed from the spool at start (left unacknowledged by a run)."),
    "unspooled": ("events_unspooled", "Requests that could not be spooled (spool full or failing disk)."),
    "resent": ("events_resent", "Events produced again after a delivery failure (broker outage)."),
    # worker sidecar
    "uploaded": ("objects_stored", "Objects written to the store."),
    "already_stored": ("objects_already_stored", "Objects the store already held (the same content)."),
    "bytes_uploaded": ("object_bytes_stored", "Bytes of objects written to the store."),
    "retries": ("upload_retries", "Upload attempts after a failed one."),
    "upload_failed": ("uploads_failed", "Objects never stored (serialization error, or the store away too long)."),
    # fetch sidecar (reuse_stored_embeddings)
    "reused": ("items_reused", "Items the engine loaded from the store instead of running the encoder."),
    "fetched": ("reuse_objects_fetched", "Stored objects fetched and checked for reuse."),
    "absent": ("reuse_objects_absent", "Items looked up for reuse with no object stored yet."),
    "rejected": ("reuse_objects_rejected", "Stored objects refused for reuse (checksum, model, input digest, "
                                           "dtype or shape): the encoder ran instead."),
    "fetch_errors": ("reuse_fetch_errors", "Reuse lookups that failed (store away, timeout): the encoder ran."),
    "bytes_fetched": ("reuse_bytes_fetched", "Tensor bytes fetched for reuse."),
}


def metrics_dir(port: int) -> Path:
    """The directory every sidecar serving ``port`` writes to (one per port and user)."""
    return Path(tempfile.gettempdir()) / f"vllm-mm-events-metrics-{os.getuid()}-{port}"


def enable_multiprocess(port: int) -> Path:
    """Point prometheus_client at the shared directory; call before any metric is created."""
    d = metrics_dir(port)
    d.mkdir(mode=0o700, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(d)
    from prometheus_client import values

    # Set here, in case prometheus_client was imported already (it reads the variable at import).
    values.ValueClass = values.MultiProcessValue(process_identifier=this_process)
    return d


_this_process: dict[int, str] = {}  # pid -> its identity; a forked child computes its own


def this_process() -> str:
    """This process's identity in file names, ``<pid>-<start time>``: prometheus_client asks at every update."""
    pid = os.getpid()
    ident = _this_process.get(pid)
    if ident is None:
        ident = _this_process[pid] = process_identity(pid) or str(pid)
    return ident


def process_identity(pid: int) -> str | None:
    """``<pid>-<start time in clock ticks since boot>`` of a running process; None if there is none
    (or no ``/proc`` to tell: then files are named by pid alone, as prometheus_client does)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count the fields after its last ")".
    return f"{pid}-{int(stat[stat.rindex(b')') + 2:].split()[19])}"


def forget_dead_processes(d: Path) -> None:
    """Remove the files of sidecars that are no longer running: their pid is free, or held by a
    process started at another time."""
    for path in glob.glob(str(d / "*.db")):
        m = re.search(r"_((\d+)(-\d+)?)\.db$", path)
        if not m:
            continue
        pid = int(m.group(2))
        gone = process_identity(pid) != m.group(1) if m.group(3) else not pid_alive(pid)
        if gone:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def pid_alive(pid: int) -> bool:
    """Whether a process with that pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class ReportCounters:
    """A sidecar's counters, for its close report; with ``metrics``, every increment is also a scrape's."""

    names: tuple[str, ...] = ()

    def __init__(self, metrics: "PublisherMetrics | None" = None) -> None:
        self.metrics = metrics
        for name in self.names:
            setattr(self, name, 0)

    def inc(self, name: str, n: int = 1) -> None:
        setattr(self, name, getattr(self, name) + n)
        if self.metrics is not None:
            self.metrics.inc(name, n)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.names}


class PublisherMetrics:
    """This sidecar's metrics. ``counters[name]`` mirrors the report counter ``name``."""

    def __init__(self, registry=None) -> None:
        """``registry``: where the metrics register (default: prometheus_client's global one; in
        multiprocess mode the scrape reads the shared files, so any registry serves)."""
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        r = REGISTRY if registry is None else registry
        self.counters = {name: Counter(f"{NS}_{metric}", help_, registry=r)
                         for name, (metric, help_) in COUNTERS.items()}
        self.in_flight = Gauge(f"{NS}_events_in_flight", "Finished requests whose events are not yet delivered.",
                               multiprocess_mode="livesum", registry=r)
        self.spool_bytes = Gauge(f"{NS}_spool_bytes", "Bytes held by the durable outbox.",
                                 multiprocess_mode="livesum", registry=r)
        self.spool_max_bytes = Gauge(f"{NS}_spool_max_bytes", "The durable outbox's cap (max_spool_bytes): "
                                     "reaching it applies the backpressure policy.",
                                     multiprocess_mode="livesum", registry=r)
        self.durability_wait = Histogram(
            f"{NS}_durability_wait_seconds", "From a request's finish to its objects being durable (or the timeout).",
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.spool_lag = Histogram(
            f"{NS}_spool_lag_seconds", "From a request's finish in the scheduler to its spool record being fsynced: "
            "the window in which a returned response's event is not yet durable.",
            buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5), registry=r)

    def inc(self, name: str, n: float = 1) -> None:
        if n:
            self.counters[name].inc(n)


def serve(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:
    """Serve ``/metrics`` (every sidecar's, summed) unless another sidecar already does."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # an idle or slow client cannot hold a thread

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes are not news
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        log.info("mm-events metrics: port %d is served by another process (%s); this sidecar only writes", port, e)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="mm-events-metrics", daemon=True).start()
    log.info("mm-events metrics on http://%s:%d/metrics", host, port)
    return server
