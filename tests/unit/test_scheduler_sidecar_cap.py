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
from publisher.sidecar.messages import RequestsFinished, SchedulerInit
from publisher.sidecar.outbox import Outbox
from publisher.sidecar.process import Sidecar

CAP, N = 2, 7


def req(i: int) -> FinishedRequest:
    h = f"{i:064x}"
    return FinishedRequest(f"r{i}", f"r{i}-00000000", "m", "stop", None, 10, 2, {},
                           (MediaItem(h, "image", 0, 0, 16),), None, None, time.time())


def test_requests_read_past_the_cap_are_spooled_at_once_and_published_once(tmp_path):
    config = PublisherConfig.load({"object_store": (tmp_path / "objects").as_uri(),
                                   "event_sink": (tmp_path / "events.avro").as_uri(),
                                   "spool_dir": str(tmp_path / "spool"), "max_pending_events": CAP,
                                   "durability_timeout_s": 30, "fsync": False}, environ={})
    fd = os.memfd_create("test-settled", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16)
    counters = mmap.mmap(fd, 16)
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
