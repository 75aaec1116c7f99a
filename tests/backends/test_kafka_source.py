"""The consumer's Kafka source against the real broker: records a producer's bytes make unreadable, and
partitions assigned while the consumer is paused."""

from __future__ import annotations

import time
import uuid

from consumers.sources.kafka import KafkaSource

import consumer_run as cr


def source(kafka, topic: str) -> KafkaSource:
    s = KafkaSource(f"kafka://{kafka.bootstrap}/{topic}", f"g-{topic}", {})
    s.before_revoke = lambda gone: None
    return s


def poll_for(s: KafkaSource, seconds: float, want: int | None = None) -> list:
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end and (want is None or len(got) < want):
        got += s.poll(100, 0.2)
    return got


def test_a_record_whose_header_name_is_not_utf8_is_an_unreadable_record_not_a_stopped_consumer(kafka):
    """confluent-kafka decodes header names as UTF-8; one that is not raised SystemError out of poll, and the
    consumer stopped on that record at every restart. The bytes are put in the broker's log file here, as a
    producer in another language (or a disk) can leave them: librdkafka checks no CRCs by default."""
    from confluent_kafka import Producer

    topic = f"hdr.{uuid.uuid4().hex[:6]}"
    cr.create_topic(kafka.bootstrap, topic, 1)
    p = Producer({"bootstrap.servers": kafka.bootstrap})
    p.produce(topic, value=b"v0", headers=[("fine", b"x")])
    p.produce(topic, value=b"v1", key=b"k1", headers=[("zzNAMEzz", b"x")])
    p.produce(topic, value=b"v2")
    assert p.flush(30) == 0
    (segment,) = (kafka.dir / "data" / f"{topic}-0").glob("*.log")
    data = segment.read_bytes()
    at = data.index(b"zzNAMEzz")
    with open(segment, "r+b") as f:
        f.seek(at + 2)
        f.write(b"\xff")
    s = source(kafka, topic)
    try:
        got = poll_for(s, 30, want=3)
    finally:
        s.close()
    assert [(r.value, r.key, r.headers, r.error) for r in got] == [
        (b"v0", None, [("fine", b"x")], None),
        (b"v1", b"k1", [], "a header name is not UTF-8 text (UnicodeDecodeError)"),
        (b"v2", None, [], None)]


def test_partitions_assigned_while_paused_stay_paused(kafka):
    """The pause was applied in the assignment callback, before the client's own assignment, which came
    unpaused: a rebalance during a sink outage read the new partitions' whole backlog into memory."""
    topic = f"pause.{uuid.uuid4().hex[:6]}"
    cr.create_topic(kafka.bootstrap, topic, 2)
    cr.produce(kafka.bootstrap, topic, [(None, b"v%d" % i, i % 2) for i in range(50)])
    s = source(kafka, topic)
    try:
        s.pause()  # as the consumer is when its batches wait for a sink that is away
        assert poll_for(s, 8) == [] and len(s.assigned) == 2
        s.resume()
        assert len(poll_for(s, 30, want=50)) == 50
    finally:
        s.close()


def test_a_topic_deleted_and_created_again_stops_the_consumer_before_it_commits_past_new_records(kafka):
    """librdkafka kept its fetch position across the topic's deletion and creation, and said nothing: the
    consumer read on from offset 10 of the new topic and committed 30, and the new topic's first 10
    records were never indexed. Now the consumer stops before committing anything of the new topic, and
    a restart reads it from its beginning."""
    from backends.test_kafka_topic_recreated import admin, create_again
    from consumers.sources.base import SourceUnreadable

    topic = f"recreated.{uuid.uuid4().hex[:6]}"
    cr.create_topic(kafka.bootstrap, topic, 1)
    cr.produce(kafka.bootstrap, topic, [(None, b"old%d" % i, 0) for i in range(10)])
    s = source(kafka, topic)
    try:
        first = poll_for(s, 30, want=10)
        s.commit(first)
        poll_for(s, 10)
        assert s.commits_pending == 0 and committed(kafka, topic, s) == 10
        a = admin(kafka)
        a.delete_topics([topic])[topic].result(30)
        create_again(kafka, topic)
        cr.produce(kafka.bootstrap, topic, [(None, b"new%d" % i, 0) for i in range(30)])
        stopped, later = None, []
        end = time.monotonic() + 60
        while stopped is None and time.monotonic() < end:
            try:
                got = s.poll(30, 0.2)
                if got:
                    later += got
                    s.commit(got)
            except SourceUnreadable as e:
                stopped = e
        assert stopped is not None and "was deleted and created again" in str(stopped), [r.value for r in later]
        assert committed(kafka, topic, s) < 0  # nothing of the new topic
    finally:
        s.close()
    again = source(kafka, topic)  # the restart
    try:
        assert [r.value for r in poll_for(again, 30, want=30)] == [b"new%d" % i for i in range(30)]
    finally:
        again.close()


def committed(kafka, topic: str, s: KafkaSource) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"g-{topic}"})
    try:
        return c.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        c.close()
