"""One contract, every event sink: the local Avro log and Kafka (a real Apache Kafka broker)."""

import uuid

import fastavro
import pytest

from publisher.event_sinks import open_event_sink
from publisher.sidecar.events import FinishedRequest, build_event, producer_info
from schemas.codec import AvroCodec

from pipeline import read_topic


def event(i: int) -> dict:
    r = FinishedRequest(f"req-{i}", f"req-{i}-00000000", "m", "stop", None, 3, 2, {"i": str(i)}, (), None,
                        None, 1700000000.0 + i)
    return build_event(r, {}, producer_info("v", "float32"))


def read_all(kind, where, n, codec):
    if kind == "file":
        with open(where, "rb") as f:
            return [(r["request_id"], None) for r in fastavro.reader(f)]
    bootstrap, topic = where
    return [(codec.decode(m.value())["request_id"], m) for m in read_topic(bootstrap, topic, n)]


@pytest.fixture(params=["file", "kafka"])
def sink_and_reader(request, tmp_path):
    codec = AvroCodec()
    if request.param == "file":
        path = tmp_path / "events.avro"
        sink = open_event_sink(path.as_uri(), codec)
        where = path
    else:
        kafka = request.getfixturevalue("kafka")
        topic = f"contract-{uuid.uuid4().hex[:8]}"
        sink = open_event_sink(f"kafka://{kafka.bootstrap}/{topic}", codec, topic_partitions=3)
        where = (kafka.bootstrap, topic)
    yield request.param, sink, lambda n: read_all(request.param, where, n, codec)
    sink.close()


def test_publish_flush_deliver(sink_and_reader):
    kind, sink, read = sink_and_reader
    done = []
    for i in range(5):
        sink.publish(event(i), done.append)
    assert sink.flush(30) == 0
    assert done == [None] * 5  # each callback exactly once, no error
    got = read(5)
    assert sorted(r for r, _ in got) == [f"req-{i}" for i in range(5)]


def test_appends_across_flushes(sink_and_reader):
    kind, sink, read = sink_and_reader
    for i in range(3):
        sink.publish(event(i), lambda e: None)
        sink.flush(30)
    assert len(read(3)) == 3
