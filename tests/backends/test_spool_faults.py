"""The scheduler sidecar's outbox on a disk that refuses writes, against the real broker: the dispatcher's
loop goes on, the requests the spool could not take are published without it and counted (``unspooled``),
and a failed write leaves no torn record ahead of later ones (a restart replays nothing it should not;
acknowledgements the disk refused only mean repeats)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from unit.test_dispatcher import req
from unit.test_outbox import read_only

from backends.test_server_faults import new_topic, read
from publisher.event_sinks import open_event_sink
from publisher.sidecar.dispatcher import EventDispatcher
from publisher.sidecar.events import producer_info
from publisher.sidecar.outbox import Outbox
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec

# In a child process: a file size limit (RLIMIT_FSIZE) makes every write past it fail (EFBIG), as a full
# disk fails writes (ENOSPC). SIGXFSZ is ignored so that the write fails instead of killing the process.
CHILD = """
import json, resource, signal, sys, time
sys.path[:0] = json.loads(sys.argv[1])
from unit.test_dispatcher import req
from publisher.event_sinks import open_event_sink
from publisher.sidecar.dispatcher import EventDispatcher
from publisher.sidecar.events import producer_info
from publisher.sidecar.outbox import Outbox
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec

stream, spool, objects, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d = EventDispatcher(LocalDirStore(objects, fsync=False), open_event_sink(stream, AvroCodec()),
                    producer_info("v", "float32"), durability_timeout_s=5, outbox=Outbox(spool, stream, 1 << 30))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))  # 16 KiB per file
for i in range(n):
    d.offer(req(f"r{i}", []), {})
    if i % 7 == 6:
        d.pump()  # a pump every few requests, as the sidecar's loop does
deadline = time.monotonic() + 60
while d.in_flight and time.monotonic() < deadline:
    time.sleep(min(d.pump(), 0.05))
print(json.dumps(dict(d.stats.as_dict(), undelivered=d.close(10))))
"""


def test_a_disk_refusing_spool_writes_loses_no_event_and_stops_nothing(kafka, tmp_path):
    topic = new_topic(kafka)
    stream = f"kafka://{kafka.bootstrap}/{topic}"
    n = 600  # ~200 KB of spool records: past the 16 KiB limit in many segments; ~22 KB of acks: past it too
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sys.path), stream, str(tmp_path / "spool"),
                          str(tmp_path / "objects"), str(n)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["published"] == stats["accepted"] == n and stats["failed"] == 0 and stats["undelivered"] == 0, stats
    assert stats["unspooled"] > 0, stats  # the limit was reached: some went out without the spool
    assert "not spooled, published without the spool" in out.stderr
    codec = AvroCodec()
    ids = [codec.decode(v)["request_id"] for v in read(kafka, topic)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # every event once
    assert "cannot write acknowledgements" in out.stderr  # the acks file met the limit too, and the loop went on
    # A publisher started on the same spool replays only events that went out (their acks were lost with the
    # disk: a repeat, with the same event_id), never one that was not spooled or not published.
    replay = [r.request_id for r, _ in Outbox(tmp_path / "spool", stream, 1 << 30).take_replay()]
    assert set(replay) <= set(ids) and len(replay) < n, replay


def test_a_read_only_spool_stops_nothing_and_spooling_resumes_once_it_is_writable(kafka, tmp_path):
    """Before, the first pump on a read-only spool raised PermissionError (the emptied segment's unlink, the
    acks file's reopening): the scheduler sidecar died and nothing more was published."""
    topic = new_topic(kafka)
    stream = f"kafka://{kafka.bootstrap}/{topic}"
    box = Outbox(tmp_path / "spool", stream, 1 << 30)
    d = EventDispatcher(LocalDirStore(tmp_path / "objects", fsync=False), open_event_sink(stream, AvroCodec()),
                        producer_info("v", "float32"), durability_timeout_s=5, outbox=box)

    def deliver(names):
        for name in names:
            d.offer(req(name, []), {})
        deadline = time.monotonic() + 60
        while d.in_flight and time.monotonic() < deadline:
            time.sleep(min(d.pump(), 0.05))

    deliver(f"r{i}" for i in range(10))
    with read_only(box.dir):  # a volume remounted read-only: no create, write, truncate or unlink
        deliver(f"r{i}" for i in range(10, 30))
    deliver(f"r{i}" for i in range(30, 40))  # writable again: these are spooled
    assert d.close(10) == 0
    assert d.stats.published == 40 and d.stats.failed == 0 and d.stats.unspooled == 20, d.stats.as_dict()
    codec = AvroCodec()
    ids = [codec.decode(v)["request_id"] for v in read(kafka, topic)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))  # every event once
    # acknowledgements the read-only disk refused only mean repeats after a restart
    replay = [r.request_id for r, _ in Outbox(tmp_path / "spool", stream, 1 << 30).take_replay()]
    assert set(replay) <= {f"r{i}" for i in range(10)}, replay
