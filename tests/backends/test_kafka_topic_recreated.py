"""The scheduler sidecar's Kafka sink while its topic is deleted and created again, against the real broker:
``produce()`` then refuses records at once (``_UNKNOWN_TOPIC``), both a first publish and the re-produce after a
failed delivery. Such refusals pass: each record is tried again later, none is acknowledged as failed, none
stops the dispatcher's loop, and each is delivered once the topic is back.
"""

from __future__ import annotations

import secrets
import time

from unit.test_dispatcher import req

from backends.test_network_faults import pump_until_settled, pump_while
from backends.test_server_faults import new_topic, read
from publisher.event_sinks import open_event_sink
from publisher.event_sinks.kafka import producer_config
from publisher.sidecar.dispatcher import EventDispatcher
from publisher.sidecar.events import producer_info
from publisher.sidecar.outbox import Outbox
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec

REFRESH_MS = 200
SETTINGS = {
    "topic.metadata.refresh.interval.ms": REFRESH_MS,  # see the topic go, and come back, soon
    # librdkafka calls a topic missing only this long after its first produce to it (30 s by default): a
    # sidecar that has run for longer sees produce() refuse at once
    "topic.metadata.propagation.max.ms": 100,
    "allow.auto.create.topics": False,  # a broker that creates no topics on its own (the test broker would)
    # a record queued before the sink's producer saw the topic go fails within this, and is produced again
    "message.timeout.ms": 3000,
}


def admin(kafka):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka.bootstrap})


def create_again(kafka, topic: str, timeout: float = 60) -> None:
    """Create ``topic`` once the broker has finished deleting it (until then it says it exists)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    a = admin(kafka)
    deadline = time.monotonic() + timeout
    while True:
        try:
            a.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
            return
        except KafkaException as e:
            if e.args[0].name() != "TOPIC_ALREADY_EXISTS" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_events_refused_while_the_topic_is_recreated_are_delivered_once(kafka, tmp_path):
    from confluent_kafka import KafkaError, KafkaException, Producer

    topic = new_topic(kafka)
    stream = f"kafka://{kafka.bootstrap}/{topic}"
    sink = open_event_sink(stream, AvroCodec(), kafka=SETTINGS)
    d = EventDispatcher(LocalDirStore(tmp_path / "objects", fsync=False), sink, producer_info("v", "float32"),
                        durability_timeout_s=5, outbox=Outbox(tmp_path / "spool", stream, 1 << 30))
    # A producer with the sink's settings that met the topic at the same time: it shows when produce() refuses.
    witness = Producer(producer_config(kafka.bootstrap, "witness", SETTINGS))
    witness.produce(topic, b"")
    d.offer(req("r-before", []), {})  # no media: published at once
    pump_until_settled(d, 30)
    assert witness.flush(30) == 0 and d.stats.published == 1

    a = admin(kafka)  # alive until the result is in
    a.delete_topics([topic])[topic].result(30)
    deadline = time.monotonic() + 30
    while topic in a.list_topics(timeout=10).topics:  # the broker serves without it: no record lands there
        assert time.monotonic() < deadline, "the broker still lists the deleted topic"
        time.sleep(0.05)
    # Produced before the producer knows the topic is gone: the deliveries fail and the re-produce is refused.
    in_flight = [req(f"a{i}", []) for i in range(10)]
    for r in in_flight:
        d.offer(r, {})
    d.pump()

    deadline = time.monotonic() + 30
    while True:
        try:
            witness.produce(topic, b"")
        except KafkaException as e:
            assert e.args[0].code() == KafkaError._UNKNOWN_TOPIC, e
            break
        assert time.monotonic() < deadline, "produce() never refused a record for the deleted topic"
        witness.poll(0.05)
    witness.purge()  # its probes never reach the topic created again
    time.sleep(2 * REFRESH_MS / 1000)  # the sink's producer has refreshed its metadata too
    refused = [req(f"b{i}", []) for i in range(10)]
    for r in refused:
        d.offer(r, {})
    n = len(in_flight) + len(refused)
    pump_while(d, lambda: sink.resends < n, 10)  # each refused, then tried again (at least once)
    assert sink.resends >= n, sink.resends
    assert d.stats.published == 1 and d.stats.failed == 0, d.stats.as_dict()
    assert sink.flush(0) == n  # none delivered yet, none given up

    create_again(kafka, topic)
    pump_until_settled(d, 60)
    resent = d.stats.as_dict().pop("resent")
    assert resent == sink.resends >= n
    assert {k: v for k, v in d.stats.as_dict().items() if k != "resent"} == {
        "accepted": n + 1, "published": n + 1, "incomplete": 0, "failed": 0, "dropped": 0, "store_errors": 0,
        "replayed": 0, "unspooled": 0}
    assert d.close(10) == 0
    assert Outbox(tmp_path / "spool", stream, 1 << 30).take_replay() == []  # every event acknowledged

    codec = AvroCodec()
    ids = [codec.decode(v)["event_id"] for v in read(kafka, topic)]
    assert sorted(ids) == sorted(r.event_id for r in in_flight + refused)  # each once, on the new topic
    witness.flush(0)


def test_a_record_too_large_is_failed_at_once(kafka, tmp_path):
    """What fails on every try is raised by publish: the dispatcher counts it failed and drops it from the
    outbox. The broker's own limit is not reached here: librdkafka's ``message.max.bytes`` refuses first."""
    topic = new_topic(kafka)
    stream = f"kafka://{kafka.bootstrap}/{topic}"
    sink = open_event_sink(stream, AvroCodec(), kafka={"message.max.bytes": 1000})
    d = EventDispatcher(LocalDirStore(tmp_path / "objects", fsync=False), sink, producer_info("v", "float32"),
                        durability_timeout_s=5, outbox=Outbox(tmp_path / "spool", stream, 1 << 30))
    big = req("r-big", [])
    big = type(big)(**{**vars(big), "metadata": {"pad": "x" * 2000}})
    d.offer(big, {})
    pump_until_settled(d, 10)
    assert d.stats.failed == 1 and d.stats.published == 0 and sink.resends == 0
    assert d.close(5) == 0
    assert Outbox(tmp_path / "spool", stream, 1 << 30).take_replay() == []


def test_a_record_the_broker_refuses_as_too_large_is_failed_once_not_sent_forever(kafka, tmp_path):
    """The topic's own max.message.bytes is below the client's: librdkafka sends the record and the broker
    refuses it (delivery error MSG_SIZE_TOO_LARGE), with every record batched with it. Before, each was sent
    again at once, in a hot loop, for good (the small one too: batched with the large one again). Now each
    is sent again alone: the small one goes through, the large one is refused alone, failed once and
    dropped from the outbox (every replay would be refused alike)."""
    from confluent_kafka.admin import NewTopic

    topic = f"small-{tmp_path.name[-8:]}-{time.monotonic_ns() % 10**6}"
    a = admin(kafka)  # alive until the result is in
    a.create_topics([NewTopic(topic, 1, 1, config={"max.message.bytes": "2000"})])[topic].result(30)
    stream = f"kafka://{kafka.bootstrap}/{topic}"
    sink = open_event_sink(stream, AvroCodec(), kafka={})
    d = EventDispatcher(LocalDirStore(tmp_path / "objects", fsync=False), sink, producer_info("v", "float32"),
                        durability_timeout_s=5, outbox=Outbox(tmp_path / "spool", stream, 1 << 30))
    big = req("r-big", [])
    pad = secrets.token_urlsafe(6000)  # random: compression cannot bring it under the limit
    d.offer(type(big)(**{**vars(big), "metadata": {"pad": pad}}), {})
    d.offer(req("r-small", []), {})
    pump_until_settled(d, 30)
    assert (d.stats.failed, d.stats.published) == (1, 1), d.stats.as_dict()
    assert sink.resends <= 2  # each sent again once at most (alone), whether or not they shared a batch
    assert d.close(5) == 0
    assert Outbox(tmp_path / "spool", stream, 1 << 30).take_replay() == []
    assert [AvroCodec().decode(v)["request_id"] for v in read(kafka, topic)] == ["r-small"]
