"""The Kafka event sink's own behaviour beyond the event-sink contract, against a real broker."""

import uuid

import pytest
from contract.test_event_sink import event, read_all

from publisher.event_sinks import open_event_sink
from schemas.codec import AvroCodec


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
