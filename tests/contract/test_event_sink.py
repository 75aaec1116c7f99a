"""One contract, every event sink: the local Avro log and Kafka (a real Apache Kafka broker)."""

import uuid

import fastavro
import pytest
from confluent_kafka import Consumer

from publisher.events import AvroCodec, FinishedRequest, build_event, producer_info
from publisher.sinks import open_event_sink


def event(i: int) -> dict:
    r = FinishedRequest(f"req-{i}", f"req-{i}-00000000", "m", "stop", None, 3, 2, {"i": str(i)}, (), None,
                        None, 1700000000.0 + i)
    return build_event(r, {}, producer_info("v", "float32"))


def read_all(kind, where, n, codec):
    if kind == "file":
        with open(where, "rb") as f:
            return [(r["request_id"], None) for r in fastavro.reader(f)]
    bootstrap, topic = where
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4()}", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    out = []
    try:
        for _ in range(200):
            m = c.poll(0.5)
            if m is None or m.error():
                if len(out) >= n:
                    break
                continue
            out.append((codec.decode(m.value())["request_id"], m))
    finally:
        c.close()
    return out


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


def test_kafka_record_key_and_cloudevents_headers(kafka):
    topic = f"hdr-{uuid.uuid4().hex[:8]}"
    codec = AvroCodec()
    sink = open_event_sink(f"kafka://{kafka.bootstrap}/{topic}", codec, topic_partitions=1)
    e = event(7)
    sink.publish(e, lambda err: None)
    assert sink.flush(30) == 0
    (rid, msg), = read_all("kafka", (kafka.bootstrap, topic), 1, codec)
    headers = dict(msg.headers())
    assert msg.key() == b"req-7"
    assert headers["ce_id"] == e["event_id"].encode() and headers["content-type"] == b"application/avro"
    assert headers["ce_specversion"] == b"1.0"


def test_kafka_refuses_non_idempotent_settings(kafka):
    with pytest.raises(ValueError, match="kafka.acks"):
        open_event_sink(f"kafka://{kafka.bootstrap}/t", AvroCodec(), kafka={"acks": "1"})


def test_kafka_unreachable_broker_reports_failure():
    sink = open_event_sink("kafka://127.0.0.1:1/t", AvroCodec(), kafka={"message.timeout.ms": 500})
    sink.resend_attempts = 1
    errors = []
    sink.publish(event(1), errors.append)
    left = sink.flush(10)
    assert left == 0 and len(errors) == 1 and "Kafka delivery failed" in str(errors[0])
    assert sink.resends == 1
