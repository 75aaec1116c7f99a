"""Dead-letter backends' own behaviour beyond the contract: the file writes only on flush, whole lines or
none; a Kafka dead letter too large for the broker goes out shortened; `none` logs and drops."""

import logging
import uuid

from contract.test_dead_letters import COORDS, read_dlq_topic, read_file

from consumers.dead_letters import open_dead_letters


def test_nothing_is_written_before_flush_for_the_file(tmp_path):
    path = tmp_path / "x.dlq.jsonl"
    dead_letters = open_dead_letters(path.as_uri(), (tmp_path / "events.avro").as_uri(), "grp", {})
    dead_letters.send(b"v", None, [], "bad_object", "e", COORDS)
    assert not path.exists()
    dead_letters.flush()
    assert len(read_file(path, 1)) == 1


def test_none_logs_and_drops(tmp_path):
    class Lines(logging.Handler):
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler = Lines()
    logger = logging.getLogger("vllm_mm_events.consumer")  # ours may not propagate to pytest's capture
    logger.addHandler(handler)
    try:
        with open_dead_letters("none", (tmp_path / "events.avro").as_uri(), "grp", {}) as dead_letters:
            dead_letters.send(b"v", None, [], "bad_object", "broken", COORDS)
            dead_letters.flush()
    finally:
        logger.removeHandler(handler)
    assert len(handler.lines) == 1 and "bad_object" in handler.lines[0] and "broken" in handler.lines[0]


def test_a_value_too_large_for_the_broker_is_dead_lettered_shortened(kafka):
    """A hostile producer's record near the broker's limit cannot be dead-lettered whole (librdkafka's own
    limit is lower, and the dlq.* headers add to it): it goes out with the start of its value and a
    ``dlq.truncated`` note, instead of failing the batch on every retry."""
    source = f"kafka://{kafka.bootstrap}/dlq-large-{uuid.uuid4().hex[:8]}"
    value = bytes(range(256)) * 4400  # 1.1 MB, over librdkafka's message.max.bytes (1,000,000)
    with open_dead_letters(None, source, "grp", {}) as dead_letters:
        dead_letters.send(value, b"k", [("ce_id", b"e-1")], "undecodable", "not Avro", COORDS)
        dead_letters.send(b"small", b"k", [], "undecodable", "not Avro", COORDS)
        dead_letters.flush()
    got = sorted(read_dlq_topic(kafka.bootstrap, source.rsplit("/", 1)[1] + ".dlq", 2), key=lambda g: len(g["value"]))
    assert [g["value"] for g in got] == [b"small", value[:64 << 10]]
    assert got[1]["reason"] == "undecodable" and got[1]["source"] == COORDS and "ce_id" not in got[1]["headers"]
    assert got[1]["headers"]["dlq.truncated"] == f"value {len(value)} bytes (kept {64 << 10}), 1 original header(s)"


def test_a_failed_file_write_leaves_no_half_line_and_keeps_the_records(tmp_path):
    """The disk fills mid-write (RLIMIT_FSIZE, in a child process): ``Transient``, the file as it was,
    and the next flush writes every record."""
    import json
    import subprocess
    import sys

    path = tmp_path / "x.dlq.jsonl"
    script = f"""
import resource, signal, sys
sys.path[:0] = {sys.path!r}
from consumers.dead_letters import open_dead_letters
from consumers.errors import Transient
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
d = open_dead_letters({path.as_uri()!r}, "file:///events.avro", "grp", {{}})
d.send(b"first", None, [], "bad_object", "e", {{}})
d.flush()
size = {str(path)!r} and __import__("os").path.getsize({str(path)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
for i in range(3):
    d.send(b"x" * 200, None, [("h", None)], "bad_object", "e%d" % i, {{}})
try:
    d.flush()
    print("no error")
except Transient as e:
    print("transient", __import__("os").path.getsize({str(path)!r}) == size)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
d.flush()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["transient", "True"]
    lines = [json.loads(x) for x in path.read_text().splitlines()]  # every line whole
    assert [x["error"] for x in lines] == ["e", "e0", "e1", "e2"]
    assert lines[1]["headers"] == [["h", None]]
    assert path.stat().st_mode & 0o777 == 0o640  # copies of events, as private as the event log


def test_a_dead_letter_topic_with_a_small_message_limit_takes_shortened_records(kafka):
    """A dead-letter topic whose max.message.bytes is below 64 KiB refused a 60 KB value for good (it was
    shortened only past 64 KiB) and a 200 KB one after its first shortening: the flush never passed, so
    no source offset was committed again on any partition."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from consumers.errors import Transient

    topic = f"dlq-small-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})  # must outlive its future
    admin.create_topics([NewTopic(topic, 1, 1, config={"max.message.bytes": "20000"})])[topic].result(30)
    values = [bytes(range(256)) * 235, bytes(range(256)) * 800]  # 60 KB, 200 KB
    with open_dead_letters(f"kafka://{kafka.bootstrap}/{topic}", "kafka://b/events", "grp", {}) as dead_letters:
        for v in values:
            # a producer's own dlq.truncated header was read as this queue's note: AttributeError, a stopped consumer
            dead_letters.send(v, b"k", [("ce_id", b"e-1"), ("dlq.truncated", b"forged")], "undecodable", "not Avro",
                              COORDS)
        for attempt in range(10):  # as the consumer retries its flush
            try:
                dead_letters.flush()
                break
            except Transient:
                continue
        else:
            raise AssertionError("never delivered")
    got = sorted(read_dlq_topic(kafka.bootstrap, topic, 2), key=lambda g: g["headers"]["dlq.truncated"])
    for g, v in zip(got, sorted(values, key=len, reverse=True)):
        kept = len(g["value"])
        assert 0 < kept < 20000 and g["value"] == v[:kept] and g["reason"] == "undecodable"
        assert g["headers"]["dlq.truncated"] == f"value {len(v)} bytes (kept {kept}), 2 original header(s)"
