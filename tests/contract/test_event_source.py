"""One contract, every event source: the embedded Avro event log and Kafka (a real Apache Kafka broker).

Events are written by the publisher's own event sinks, read back through the source:
everything is handed out once, a commit is where a new reader of the same group resumes,
and ``caught_up`` says when everything that existed has been handed out.
"""

from __future__ import annotations

import time
import uuid

import pytest

from consumers.decoder import EventDecoder
from consumers.sources import open_source
from publisher.event_sinks import open_event_sink
from publisher.sidecar.events import FinishedRequest, build_event, producer_info
from schemas import event_schema
from schemas.codec import AvroCodec


def event(i: int) -> dict:
    r = FinishedRequest(f"req-{i}", f"req-{i}-00000000", "m", "stop", None, 3, 2, {"i": str(i)}, (), None,
                        None, 1700000000.0 + i)
    return build_event(r, {}, producer_info("v", "float32"))


def publish(uri: str, events: list[dict]) -> None:
    with open_event_sink(uri, AvroCodec(), topic_partitions=1) as sink:
        delivered = []
        for e in events:
            sink.publish(e, delivered.append)
        assert sink.flush(30) == 0
        assert delivered == [None] * len(events)


def drain(source, timeout: float = 60.0) -> list:
    """Poll until the source says it is caught up (what ``--once`` does)."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        out += source.poll(4, 0.2)
        if source.caught_up():
            return out
    raise AssertionError(f"not caught up after {timeout}s ({len(out)} records)")


def request_ids(records) -> list[str]:
    decoder = EventDecoder()
    return [(r.event if r.event is not None else decoder.decode(r.value))["request_id"] for r in records]


@pytest.fixture(params=["event_log", "kafka"])
def stream(request, tmp_path):
    """(source URI, open(group) -> source)."""
    if request.param == "event_log":
        uri = (tmp_path / "events.avro").as_uri()
        settings: dict = {}
    else:
        kafka = request.getfixturevalue("kafka")
        uri = f"kafka://{kafka.bootstrap}/source-contract-{uuid.uuid4().hex[:8]}"
        settings = {"session.timeout.ms": 6000}
    return uri, lambda group: open_source(uri, group, kafka=settings, checkpoint=None, reader_schema=event_schema())


def test_everything_is_handed_out_once_in_order(stream):
    uri, open_ = stream
    publish(uri, [event(i) for i in range(7)])
    with open_("g1") as source:
        got = drain(source)
        assert request_ids(got) == [f"req-{i}" for i in range(7)]
        assert source.poll(4, 0.5) == []  # nothing twice
        assert all(r.coords for r in got)  # every record says where it came from (dead letters need it)


def test_a_new_reader_resumes_after_the_last_commit(stream):
    uri, open_ = stream
    publish(uri, [event(i) for i in range(6)])
    with open_("g2") as source:
        got = drain(source)
        source.commit(got[:4])
    publish(uri, [event(i) for i in range(6, 8)])
    with open_("g2") as source:  # same group: after the commit, including what was appended since
        assert request_ids(drain(source)) == ["req-4", "req-5", "req-6", "req-7"]
    with open_("another-group") as source:  # another group: from the beginning
        assert len(drain(source)) == 8


def test_caught_up_only_once_everything_is_read(stream):
    uri, open_ = stream
    publish(uri, [event(i) for i in range(5)])
    with open_("g3") as source:
        first = source.poll(2, 10)
        assert 1 <= len(first) <= 2
        assert not source.caught_up()
        rest = drain(source)
        assert len(first) + len(rest) == 5 and source.caught_up()


def test_caught_up_as_the_last_record_is_handed_out(stream):
    """No wait for an empty read after the last record: ``--once`` ends as soon as what existed is out."""
    uri, open_ = stream
    publish(uri, [event(i) for i in range(5)])
    with open_("g4") as source:
        got, deadline = [], time.monotonic() + 60
        while len(got) < 5 and time.monotonic() < deadline:
            got += source.poll(5 - len(got), 0.5)
            if len(got) < 5:
                assert not source.caught_up()
        assert request_ids(got) == [f"req-{i}" for i in range(5)]
        assert source.caught_up()

