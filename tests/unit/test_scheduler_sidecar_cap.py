"""The scheduler sidecar at its in-flight cap (``max_pending_events``): what it reads past the cap is
held back (parked) until events settle, but spooled at once. With ``durable_before_return`` the engine
holds each step's responses until the spool has their requests (a shared counter); before, a parked
request was spooled only once the sink caught up, so the engine waited its 5 s bound and answered
anyway, the response out before its request was durable.

A real scheduler sidecar, with the embedded store and event log: the requests name objects that are
never stored, so the first ones stay in flight for ``durability_timeout_s``."""

from __future__ import annotations

import mmap
import os
import struct
import time

import fastavro

from publisher.config import PublisherConfig
from publisher.sidecar.events import FinishedRequest, MediaItem, producer_info
from publisher.sidecar.messages import CLOSING_AT, GAUGE_BYTES, RequestsFinished, SchedulerInit
from publisher.sidecar.outbox import Outbox
from publisher.sidecar.process import PARKED, Sidecar

CAP, N = 2, 7


def req(i: int) -> FinishedRequest:
    h = f"{i:064x}"
    return FinishedRequest(f"r{i}", f"r{i}-00000000", "m", "stop", None, 10, 2, {},
                           (MediaItem(h, "image", 0, 0, 16),), None, None, time.time())


def gauge() -> tuple[int, mmap.mmap]:
    """The counters the engine shares with its scheduler sidecar (as the connector makes them)."""
    fd = os.memfd_create("test-settled", os.MFD_CLOEXEC)
    os.ftruncate(fd, GAUGE_BYTES)
    return fd, mmap.mmap(fd, GAUGE_BYTES)


def capped(tmp_path) -> PublisherConfig:
    return PublisherConfig.load({"object_store": (tmp_path / "objects").as_uri(),
                                 "event_sink": (tmp_path / "events.avro").as_uri(),
                                 "spool_dir": str(tmp_path / "spool"), "max_pending_events": CAP,
                                 "durability_timeout_s": 30, "shutdown_timeout_s": 3, "fsync": False}, environ={})


def published_and_spooled(tmp_path, config) -> tuple[list[str], list[str]]:
    with open(tmp_path / "events.avro", "rb") as f:
        published = [e["request_id"] for e in fastavro.reader(f)]
    spool = Outbox(tmp_path / "spool", config.event_sink, config.max_spool_bytes, fsync=False)
    return published, [r.request_id for r, _ in spool.take_replay()]


def test_requests_read_past_the_cap_are_spooled_at_once_and_published_once(tmp_path):
    config = capped(tmp_path)
    fd, counters = gauge()
    sidecar = Sidecar(SchedulerInit(config.to_dict(), fd, producer_info("v", "float32")), pass_fds=(fd,))
    try:
        sidecar.send(RequestsFinished(tuple((req(i), {f"{i:064x}": f"emb/k{i}"}, None) for i in range(N))))
        deadline = time.monotonic() + 10
        while struct.unpack_from("<Q", counters, 8)[0] < N and time.monotonic() < deadline:
            time.sleep(0.05)
        # All N durable in the spool within seconds, though only CAP are in flight (for 30 s).
        assert struct.unpack_from("<Q", counters, 8)[0] == N
        assert struct.unpack_from("<Q", counters, 0)[0] == 0  # none settled: the cap holds
    finally:
        report = sidecar.close(2)  # published now, each with its object listed missing
    assert (report["accepted"], report["published"], report["incomplete"], report["unspooled"]) == (N, N, N, 0), \
        report
    with open(tmp_path / "events.avro", "rb") as f:
        events = list(fastavro.reader(f))
    assert sorted(e["request_id"] for e in events) == sorted(f"r{i}" for i in range(N))  # each once
    # Each spooled once and acknowledged once: nothing for a restart to replay.
    assert Outbox(tmp_path / "spool", config.event_sink, config.max_spool_bytes, fsync=False).take_replay() == []


ENGINE = """
import json, os, sys, threading, time
sys.path[:0] = json.loads(sys.argv[1])
from unit.test_scheduler_sidecar_cap import capped, gauge, req
from publisher.sidecar.events import producer_info
from publisher.sidecar.messages import RequestsFinished, SchedulerInit
from publisher.sidecar.process import Sidecar
from pathlib import Path

config = capped(Path(sys.argv[2]))
fd, counters = gauge()
sidecar = Sidecar(SchedulerInit(config.to_dict(), fd, producer_info("v", "float32")), pass_fds=(fd,))
sent = [0]

def engine():  # one request per step; a send that returned is a response that went out
    for i in range(int(sys.argv[3])):
        sidecar.send(RequestsFinished(((req(i), {f"{i:064x}": f"emb/k{i}"}, None),)))
        sent[0] += 1

threading.Thread(target=engine, daemon=True).start()
time.sleep(3)  # the socket fills (the kernel's buffer) and a send blocks: the engine waits, as "block" means
print(sidecar.pid, sent[0], flush=True)
os._exit(0)  # killed, no close
"""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_what_an_engine_sent_before_it_died_at_the_cap_is_published_or_spooled(tmp_path):
    """At the cap the sidecar reads no further than PARKED requests; the rest wait in the socket, already
    answered. When the engine died it closed without reading them: 54 of 120 had no event, no spool record
    and no log line."""
    import json
    import subprocess
    import sys

    log = tmp_path / "engine.log"
    with open(log, "w") as f:  # not a pipe: the sidecar inherits it and outlives the engine
        p = subprocess.run([sys.executable, "-c", ENGINE, json.dumps(sys.path), str(tmp_path), "1000"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=60)
    assert p.returncode == 0, log.read_text()[-3000:]
    pid, n = (int(x) for x in log.read_text().splitlines()[-1].split())
    assert n > CAP + PARKED + 10, n  # requests were left in the socket, past what the sidecar read
    deadline = time.monotonic() + 30
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pid)
    published, spooled = published_and_spooled(tmp_path, capped(tmp_path))
    assert len(published) == len(set(published)) and not set(published) & set(spooled)
    answered = {f"r{i}" for i in range(n)}
    assert answered <= set(published + spooled), sorted(answered - set(published + spooled))  # each once


def test_an_engine_closing_at_the_cap_gets_its_report_and_every_request_its_event(tmp_path):
    """The Close sat behind requests the sidecar would not read at the cap: the engine waited out its timeout
    with no report, and the requests behind it were lost."""
    config = capped(tmp_path)
    fd, counters = gauge()
    sidecar = Sidecar(SchedulerInit(config.to_dict(), fd, producer_info("v", "float32")), pass_fds=(fd,))
    n = 120
    for i in range(n):
        sidecar.send(RequestsFinished(((req(i), {f"{i:064x}": f"emb/k{i}"}, None),)))
    counters[CLOSING_AT] = 1  # as the connector does at shutdown
    t0 = time.monotonic()
    report = sidecar.close(3)
    assert time.monotonic() - t0 < 6
    assert (report["accepted"], report["published"], report["undelivered"]) == (n, n, 0), report
    published, spooled = published_and_spooled(tmp_path, config)
    assert sorted(published) == sorted(f"r{i}" for i in range(n)) and spooled == []
