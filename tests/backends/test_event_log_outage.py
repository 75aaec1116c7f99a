"""The embedded event log on a disk that refuses writes for a while (a full disk: here a file size limit,
RLIMIT_FSIZE, makes every write past it fail as ENOSPC would): its events wait, in flight, and are written
once the disk takes them again, in the same run; each exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import fastavro

CHILD = """
import json, resource, signal, sys, time
sys.path[:0] = json.loads(sys.argv[1])
from unit.test_dispatcher import req
from backends.test_event_log_outage import pump_while_in_flight
from publisher.event_sinks.avro_file import AvroFileSink
from publisher.sidecar.dispatcher import EventDispatcher
from publisher.sidecar.events import producer_info
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec

log_path, objects = sys.argv[2], sys.argv[3]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d = EventDispatcher(LocalDirStore(objects, fsync=False), AvroFileSink(log_path, AvroCodec()),
                    producer_info("v", "float32"), durability_timeout_s=5)

def settle(seconds):
    pump_while_in_flight(d, seconds)

for i in range(20):
    d.offer(req(f"before-{i}", []), {})
settle(10)
size = __import__("os").path.getsize(log_path)
# The disk fills up: a batch's first block (fastavro writes one per 16 KB of records) fits, the next does not.
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20_000, resource.RLIM_INFINITY))
for i in range(300):
    d.offer(req(f"during-{i}", []), {})
d.pump()
settle(3)
during = dict(d.stats.as_dict(), in_flight=d.in_flight)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space is back
settle(30)
print(json.dumps({"during": during, "after": dict(d.stats.as_dict(), in_flight=d.in_flight), "left": d.close(5)}))
"""


def pump_while_in_flight(d, seconds: float) -> None:
    """Pump a dispatcher, as the sidecar's loop does, until nothing is in flight or ``seconds`` have passed."""
    end = time.monotonic() + seconds
    while d.in_flight and time.monotonic() < end:
        time.sleep(min(d.pump(), 0.05))


def test_events_the_log_could_not_take_are_written_once_the_disk_takes_them(tmp_path):
    """They were reported failed at the first refusal and left in the spool until the next start; with the
    spool at its cap, the sidecar stopped reading and the engine blocked for good, though the disk was back."""
    log = tmp_path / "events.avro"
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sys.path), str(log), str(tmp_path / "objects")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    during, after = report["during"], report["after"]
    assert (during["published"], during["failed"], during["in_flight"]) == (20, 0, 300), during  # they wait
    assert (after["published"], after["failed"], after["in_flight"], report["left"]) == (320, 0, 0, 0), after
    assert after["resent"] > 0  # tried again while the disk refused them
    assert out.stderr.count("cannot write the event log") == 1, out.stderr[-3000:]  # once per outage
    assert "is written again" in out.stderr
    with open(log, "rb") as f:
        ids = [r["request_id"] for r in fastavro.reader(f)]
    # once each, in order: the blocks of a failed append were cut off, not left to be written again
    assert ids == [f"before-{i}" for i in range(20)] + [f"during-{i}" for i in range(300)]


def test_a_file_at_the_log_path_that_is_not_a_log_holds_events_and_one_that_does_not_encode_is_failed_alone(tmp_path):
    """Events wait (in flight, spooled) while the path holds something else, and are written once it is a
    log again; only an event that does not encode is failed (and dropped from the spool), the others of its
    batch are written once each."""
    from dataclasses import replace

    from unit.test_dispatcher import req

    from publisher.event_sinks.avro_file import AvroFileSink
    from publisher.sidecar.dispatcher import EventDispatcher
    from publisher.sidecar.events import producer_info
    from publisher.sidecar.outbox import Outbox
    from publisher.stores.local import LocalDirStore
    from schemas.codec import AvroCodec

    log = tmp_path / "events.avro"
    log.write_text("not a log\n")
    outbox = Outbox(tmp_path / "spool", log.as_uri(), 1 << 20, fsync=False)
    d = EventDispatcher(LocalDirStore(tmp_path / "objects", fsync=False), AvroFileSink(log, AvroCodec()),
                        producer_info("v", "float32"), durability_timeout_s=5, outbox=outbox)

    def settle(seconds):
        pump_while_in_flight(d, seconds)

    for i in range(3):
        d.offer(req(f"r{i}", []), {})
    settle(2)
    assert (d.stats.published, d.stats.failed, d.in_flight) == (0, 0, 3)
    log.unlink()
    settle(15)
    assert (d.stats.published, d.stats.failed, d.in_flight) == (3, 0, 0)
    bad = replace(req("bad", []), metadata={"n": 5})  # not a string: Avro's map<string> cannot hold it
    for i in range(200):
        d.offer(bad if i == 100 else req(f"s{i}", []), {})
    settle(15)
    assert (d.stats.published, d.stats.failed, d.in_flight) == (202, 1, 0)
    assert d.close(2) == 0
    with open(log, "rb") as f:
        ids = [r["request_id"] for r in fastavro.reader(f)]
    assert ids == [f"r{i}" for i in range(3)] + [f"s{i}" for i in range(200) if i != 100]
    assert Outbox(tmp_path / "spool", log.as_uri(), 1 << 20, fsync=False).take_replay() == []
