"""The publisher's sidecar components and the consumer's clients through network faults: Toxiproxy between
them and Kafka, MinIO or PostgreSQL (fixtures ``toxiproxy``, ``proxied_kafka``), with latency, connection
resets, the proxy down for longer than the clients' timeouts, or a silent server (connections held open,
nothing passed: the ``*never_answers*`` tests), then healed. Real components, not the engine (tests/e2e
has the engine's fault tests): the scheduler sidecar's ``EventDispatcher`` + ``Outbox`` + the Kafka sink,
the worker sidecar's ``ObjectUploader`` + the S3 store, the dispatcher's ``head_many`` on S3, the
consumer's Kafka commits and its pgvector sink.

Every check reads back through the real server directly, not through the proxy.
"""

from __future__ import annotations

import time
import uuid

import pytest
import torch
from unit.test_dispatcher import put, req

from backends.test_server_faults import committed, new_topic, produce, read
from publisher.event_sinks import open_event_sink
from publisher.event_sinks.avro_file import AvroFileSink
from publisher.sidecar.dispatcher import EventDispatcher
from publisher.sidecar.encode import encode_embedding
from publisher.sidecar.events import producer_info
from publisher.sidecar.outbox import Outbox
from publisher.sidecar.uploader import ObjectUploader, UploadJob
from publisher.stores import open_store
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec
from schemas.objects import object_key

from pipeline import read_event_log

MESSAGE_TIMEOUT_MS = 3000  # librdkafka gives a record up after this; the sink produces it again
OUTAGE_S = 4.5  # longer than MESSAGE_TIMEOUT_MS
KAFKA_SETTINGS = {"message.timeout.ms": MESSAGE_TIMEOUT_MS,
                  # reconnect soon after the heal (librdkafka's default backs off up to 10 s)
                  "reconnect.backoff.ms": 100, "reconnect.backoff.max.ms": 1000}


def pump(d: EventDispatcher, seconds: float, offer: list | None = None) -> None:
    """Pump for ``seconds``, offering ``offer``'s (request, keys) pairs spread evenly over the time."""
    offer = list(offer or [])
    start = time.monotonic()
    end = start + seconds
    step = seconds / max(1, len(offer))
    while time.monotonic() < end or offer:
        while offer and time.monotonic() >= start:
            d.offer(*offer.pop(0))
            start += step
        time.sleep(min(d.pump(), max(0.0, end - time.monotonic())))


def pump_while(d: EventDispatcher, cond, timeout: float) -> float:
    """Pump while ``cond()`` holds, for at most ``timeout`` seconds; returns the seconds it took."""
    started = time.monotonic()
    while cond() and time.monotonic() - started < timeout:
        time.sleep(d.pump())
    return time.monotonic() - started


def pump_until_settled(d: EventDispatcher, timeout: float) -> float:
    """Pump until every accepted event is delivered or failed; returns the seconds it took."""
    took = pump_while(d, lambda: d.in_flight > 0, timeout)
    assert d.in_flight == 0, f"{d.in_flight} event(s) still in flight after {timeout} s: {d.stats.as_dict()}"
    return took


# ---- Kafka: the scheduler sidecar's dispatcher, outbox and Kafka sink ------------------------------

@pytest.fixture
def kafka_proxy(proxied_kafka):
    broker, proxy = proxied_kafka
    yield broker, proxy
    proxy.heal()


def break_network(proxy, fault: str) -> None:
    if fault == "latency":
        proxy.latency(1500, jitter_ms=500)  # every answer 1-2 s late
    elif fault == "reset_requests":
        proxy.reset_peer(stream="upstream")  # each connection reset at its first request, before the server gets it
    elif fault == "reset_answers":
        proxy.reset_peer(stream="downstream")  # the server acts on the request, its answer is lost in the reset
    elif fault == "down":
        proxy.set_enabled(False)  # connections closed, new ones refused
    else:
        raise ValueError(fault)


FAULTS = ["latency", "reset_requests", "reset_answers", "down"]


@pytest.mark.parametrize("fault", FAULTS)
def test_kafka_sink_delivers_every_event_once_through_a_network_fault(kafka_proxy, tmp_path, fault):
    broker, proxy = kafka_proxy
    n = 30
    topic = f"netfaults-{fault}-{uuid.uuid4().hex[:8]}"
    stream = f"kafka://{proxy.listen}/{topic}"
    store = LocalDirStore(tmp_path / "objects", fsync=False)
    reqs = [req(f"r{i}", [f"h{i}"]) for i in range(n)]
    for r in reqs:
        put(store, r.items[0].mm_hash)
    offers = [(r, {r.items[0].mm_hash: f"k/{r.items[0].mm_hash}"}) for r in reqs]
    sink = open_event_sink(stream, AvroCodec(), kafka=KAFKA_SETTINGS, topic_partitions=1)
    d = EventDispatcher(store, sink, producer_info("v", "float32"), durability_timeout_s=30,
                        outbox=Outbox(tmp_path / "spool", stream, 1 << 30))
    d.offer(*offers.pop(0))  # connected, the topic's leader known, before the fault
    pump_until_settled(d, 30)
    assert d.stats.published == 1

    break_network(proxy, fault)  # healed by the fixture if the test fails
    started = time.monotonic()
    pump(d, OUTAGE_S if fault != "latency" else 0.5, offers)
    if fault != "latency":
        pump_while(d, lambda: sink.resends == 0, 10)  # (the timeouts are checked about once a second)
        assert sink.resends > 0  # records timed out (message.timeout.ms) and were produced again
        assert d.stats.published == 1 and d.stats.failed == 0, d.stats.as_dict()  # nothing acknowledged
        proxy.heal()
    pump_until_settled(d, 60)
    took = time.monotonic() - started
    proxy.heal()
    if fault == "latency":
        assert took >= 1.0, took  # the answers were late
    assert d.stats.published == n and d.stats.failed == 0 and d.stats.incomplete == 0, d.stats.as_dict()
    assert d.close(10) == 0
    assert Outbox(tmp_path / "spool", stream, 1 << 30).take_replay() == []  # every event acknowledged

    codec = AvroCodec()
    events = [codec.decode(v) for v in read(broker, topic)]  # the broker's own listener, not the proxy
    ids = [e["event_id"] for e in events]
    want = {r.event_id for r in reqs}
    lost, dup = len(want - set(ids)), len(ids) - len(set(ids))
    print(f"{fault}: returned={n} events={len(ids)} lost={lost} dup={dup} resends={sink.resends} "
          f"settled in {took:.1f} s")
    assert set(ids) == want and lost == 0  # every request's event, and nothing else
    assert all(e["missing_embeddings"] == [] and len(e["embeddings"]) == 1 for e in events)
    assert {e["request_id"]: e["event_id"] for e in events} == {r.request_id: r.event_id for r in reqs}



def test_a_consumer_commit_to_a_broker_that_never_answers_does_not_hold_its_loop(kafka_proxy):
    """The consumer's source commits through the proxy; the proxy then holds every connection open and
    passes nothing (Toxiproxy's timeout toxic, both ways). librdkafka's synchronous commit has no timeout
    of its own: the source commits asynchronously, its loop goes on, and the commit lands once the broker
    answers."""
    from consumers.sources.kafka import KafkaSource

    broker, proxy = kafka_proxy
    topic, group = new_topic(broker), f"g-{uuid.uuid4().hex[:8]}"  # one partition
    assert produce(broker, topic, [b"%d" % i for i in range(6)]) == (0, [None] * 6)
    source = KafkaSource(f"kafka://{proxy.listen}/{topic}", group, {"socket.timeout.ms": 5000})

    def poll_while(condition, timeout: float) -> list:
        got, deadline = [], time.monotonic() + timeout
        while condition(got) and time.monotonic() < deadline:
            got += source.poll(6, 0.2)
        return got

    try:
        records = poll_while(lambda got: len(got) < 6, 60)
        assert [r.value for r in records] == [b"%d" % i for i in range(6)]
        source.commit(records[:3])
        poll_while(lambda _: source.commits_pending, 30)
        assert source.commits_pending == 0 and committed(broker, topic, group) == 3

        proxy.timeout(0, stream="upstream")  # connections held open; nothing passes either way
        proxy.timeout(0)
        started = time.monotonic()
        source.commit(records)
        assert source.poll(6, 0.5) == []  # the loop goes on
        assert time.monotonic() - started < 2 and source.commits_pending == 1
        time.sleep(6)  # past socket.timeout.ms: the request timed out (librdkafka asks again)
        assert committed(broker, topic, group) == 3  # not landed (the broker's own listener says so)

        proxy.heal()
        poll_while(lambda _: source.commits_pending or committed(broker, topic, group) != 6, 60)
        assert source.commits_pending == 0 and committed(broker, topic, group) == 6
    finally:
        proxy.heal()
        source.close()


def test_commits_go_out_under_steady_load_when_the_topic_check_is_slower_than_the_batches(kafka_proxy):
    """Commits wait for a check of the topic's id begun after their records were handed out. With every
    answer 300 ms late, batches come faster than checks: each check used to end stale for the newest commit,
    and none was sent while batches kept coming. Each check now clears all that was handed out before it."""
    from consumers.sources.kafka import KafkaSource

    broker, proxy = kafka_proxy
    topic, group = new_topic(broker), f"g-{uuid.uuid4().hex[:8]}"
    assert produce(broker, topic, [b"%d" % i for i in range(400)])[0] == 0
    source = KafkaSource(f"kafka://{proxy.listen}/{topic}", group, {"socket.timeout.ms": 10000})
    try:
        proxy.latency(300)
        got, end = [], time.monotonic() + 8
        while time.monotonic() < end:  # a batch of 5 every 50 ms, each committed
            batch = source.poll(5, 0.05)
            if batch:
                got += batch
                source.commit(batch)
            time.sleep(0.05)
        proxy.heal()
        landed = committed(broker, topic, group)
        assert 0 < landed <= len(got) < 400, (landed, len(got))  # commits landed while batches kept coming
    finally:
        proxy.heal()
        source.close()


def test_dead_letters_refused_while_kafka_is_down_are_sent_again_before_the_commit(kafka_proxy):
    """The consumer commits a batch only once its dead letters' ``flush`` returns. Dead letters whose
    delivery failed (the broker away past message.timeout.ms) are produced again by the next flush, and
    every flush raises ``Transient`` until they are all acknowledged; none is dropped along the way."""
    from consumers.dead_letters import open_dead_letters
    from consumers.errors import Transient

    broker, proxy = kafka_proxy
    topic = new_topic(broker)
    dead_letters = open_dead_letters(f"kafka://{proxy.listen}/{topic}", f"kafka://{proxy.listen}/events", "grp",
                                     KAFKA_SETTINGS)
    try:
        proxy.set_enabled(False)
        for i in range(3):
            dead_letters.send(b"poison-%d" % i, None, [], "undecodable", f"not Avro {i}", {"offset": str(i)})
        for _ in range(2):  # a retry while the broker is still away: refused again, not forgotten
            with pytest.raises(Transient):
                dead_letters.flush()
        assert read(broker, topic, timeout=5) == []
        proxy.heal()
        deadline = time.monotonic() + 60
        while True:
            try:
                dead_letters.flush()
                break
            except Transient:
                assert time.monotonic() < deadline, "the dead letters were not delivered after the heal"
        assert sorted(read(broker, topic)) == [b"poison-0", b"poison-1", b"poison-2"]  # each once
    finally:
        proxy.heal()
        dead_letters.close()


# ---- MinIO: the worker sidecar's uploader, and the scheduler's head_many -----------------------------

@pytest.fixture
def s3_proxy(minio, toxiproxy, monkeypatch):
    """(proxy in front of MinIO, a fresh bucket); the credentials in the environment, as the sidecars get them."""
    for key, value in minio.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the stores get the proxy's URL explicitly
    proxy = toxiproxy.proxy(f"minio-{uuid.uuid4().hex[:8]}", f"{minio.host}:{minio.port}")
    bucket = minio.create_bucket(f"netfaults-{uuid.uuid4().hex[:8]}")
    yield proxy, bucket
    proxy.delete()


def stored_objects(minio, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket and its bytes, read from MinIO directly."""
    client = minio.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.parametrize("fault", FAULTS)
def test_uploader_stores_every_object_once_through_a_network_fault(minio, s3_proxy, fault):
    proxy, bucket = s3_proxy
    model, n = "m", 24
    store, prefix = open_store(f"s3://{bucket}/net", endpoint_url=f"http://{proxy.listen}")
    uploader = ObjectUploader(store, model, "float32", threads=2, retry_for_s=60)
    released = []
    want: dict[str, bytes] = {}
    jobs = []
    for i in range(n):
        mm_hash, tensor = uuid.uuid4().hex, torch.randn(4 + i % 3, 8)
        key = object_key(prefix, model, mm_hash, "float32")
        want[key] = encode_embedding(tensor, mm_hash=mm_hash, modality="image", model=model,
                                     storage_dtype="float32").data
        jobs.append(UploadJob(key, tensor, lambda k=key: released.append(k), mm_hash, "image", "ENCODER"))
    uploader.submit(jobs.pop(0))
    assert uploader.drain(30) == 0 and uploader.stats.uploaded == 1  # connected before the fault

    break_network(proxy, fault)  # the fixture deletes the proxy if the test fails
    started = time.monotonic()
    for job in jobs:
        uploader.submit(job)
    if fault != "latency":
        assert uploader.drain(OUTAGE_S) == len(jobs)  # nothing done while MinIO is out of reach
        assert uploader.stats.retries > 0 and uploader.stats.upload_failed == 0, uploader.stats.as_dict()
        proxy.heal()
    left = uploader.drain(60)
    took = time.monotonic() - started
    proxy.heal()
    stats = uploader.stats
    print(f"{fault}: submitted={n} stored={stats.uploaded} already_stored={stats.already_stored} "
          f"failed={stats.upload_failed} retries={stats.retries} in {took:.1f} s")
    assert left == 0 and stats.upload_failed == 0, stats.as_dict()
    assert stats.uploaded + stats.already_stored == n  # already_stored: a PUT whose answer was lost, then 412
    if fault == "reset_answers":
        assert stats.already_stored > 0  # MinIO stored some during the outage: put-if-absent kept them single
    if fault == "latency":
        assert took >= 1.0
    assert sorted(released) == sorted(want)  # every ring region given back, once
    got = stored_objects(minio, bucket)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)  # each object once, right bytes
    uploader.close(5)
    store.close()


def test_s3_heads_from_a_server_that_never_answers_end_after_their_timeout(minio, s3_proxy):
    """The scheduler sidecar checks objects with HEADs on its only thread: through a proxy that holds the
    connection open and passes nothing, head_many gives up after the HEAD timeout (5 s) on the kept-alive
    connection and 5 s on one fresh try (a middlebox may drop an idle connection silently), not after the
    client's 30 s socket timeout twice; once healed, the same store answers."""
    proxy, bucket = s3_proxy
    direct, _ = open_store(f"s3://{bucket}/silent", endpoint_url=minio.endpoint)
    via_proxy, _ = open_store(f"s3://{bucket}/silent", endpoint_url=f"http://{proxy.listen}")
    put(direct, "ab")
    key = "k/ab"
    assert via_proxy.head_many([key])[0] is not None  # a keep-alive connection, before the fault

    proxy.timeout(0, stream="upstream")
    proxy.timeout(0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        via_proxy.head_many([key])
    took = time.monotonic() - started
    assert 9 <= took < 15, took

    proxy.heal()
    assert via_proxy.head_many([key])[0].size == direct.head_many([key])[0].size
    via_proxy.close()
    direct.close()


@pytest.mark.parametrize("fault", ["reset_requests", "down"])
def test_dispatcher_waits_out_an_s3_outage_then_publishes_complete_events(minio, s3_proxy, tmp_path, fault):
    """head_many through the proxy: while MinIO is out of reach no event goes out (none would name its
    objects); once it is back, within durability_timeout_s, every event names all of them."""
    proxy, bucket = s3_proxy
    direct, prefix = open_store(f"s3://{bucket}/net", endpoint_url=minio.endpoint)
    via_proxy, _ = open_store(f"s3://{bucket}/net", endpoint_url=f"http://{proxy.listen}")
    n = 12
    reqs = [req(f"r{i}", [f"{i:02x}a", f"{i:02x}b"]) for i in range(n)]
    offers = []
    for r in reqs:
        keys = {}
        for item in r.items:
            keys[item.mm_hash] = key = object_key(prefix, "m", item.mm_hash, "float32")
            obj = encode_embedding(torch.randn(3, 8), mm_hash=item.mm_hash, modality="image", model="m",
                                   storage_dtype="float32")
            assert direct.put_if_absent(key, obj.data, obj.object_metadata())
        offers.append((r, keys))
    log = tmp_path / "events.avro"
    d = EventDispatcher(via_proxy, AvroFileSink(log, AvroCodec()), producer_info("v", "float32"),
                        durability_timeout_s=20)

    break_network(proxy, fault)
    pump(d, OUTAGE_S, offers)
    assert d.stats.published == 0 and d.stats.store_errors > 0, d.stats.as_dict()  # waiting, not giving up
    proxy.heal()
    took = pump_until_settled(d, 30)
    assert d.stats.published == n and d.stats.incomplete == 0 and d.stats.failed == 0, d.stats.as_dict()
    assert d.close(5) == 0
    events = read_event_log(log)
    print(f"{fault}: requests={n} events={len(events)} store_errors={d.stats.store_errors} "
          f"settled {took:.1f} s after the heal")
    assert sorted(e["event_id"] for e in events) == sorted(r.event_id for r in reqs)
    for e in events:
        assert e["missing_embeddings"] == [] and len(e["embeddings"]) == 2
        assert all(x["uri"].startswith(f"s3://{bucket}/net/") for x in e["embeddings"])
    direct.close()
    via_proxy.close()


# ---- PostgreSQL: the pgvector sink ----------------------------------------------------------------

def test_pgvector_through_a_server_that_never_answers_fails_transient_then_writes(postgres, toxiproxy, monkeypatch):
    """libpq waits on a query without a timeout: through a proxy that holds the connection open and passes
    nothing, the sink's watchdog ends the upsert as Transient after OP_TIMEOUT_S (the writer retries it);
    once the path heals the next upsert reconnects and writes, and the table holds each point once."""
    import psycopg
    from contract.test_vector_sink import make_points

    from consumers.errors import Transient
    from consumers.sinks.pgvector import PgvectorSink

    monkeypatch.setenv("PGPASSWORD", postgres.env["PGPASSWORD"])
    monkeypatch.setattr(PgvectorSink, "OP_TIMEOUT_S", 2.0)
    proxy = toxiproxy.proxy(f"pg-{uuid.uuid4().hex[:8]}", f"{postgres.host}:{postgres.port}")
    table = "t_" + uuid.uuid4().hex[:10]
    direct = PgvectorSink(postgres.uri(table))
    sink = PgvectorSink(postgres.uri(table).replace(f":{postgres.port}/", f":{proxy.port}/"))
    try:
        points = make_points(6, dim=8)
        sink.create(8, False)
        sink.upsert(points[:3])

        proxy.timeout(0, stream="upstream")
        proxy.timeout(0)
        started = time.monotonic()
        with pytest.raises(Transient, match="no answer in 2 s"):
            sink.upsert(points)
        assert time.monotonic() - started < 10
        assert direct.count() == 3  # nothing of the failed transaction

        proxy.heal()
        sink.upsert(points)  # the writer's retry: a new connection
        assert direct.count() == 6 and sink.count() == 6

        # A server that runs cancels a statement itself (statement_timeout, set below the watchdog's
        # limit), so an abandoned one does not keep its locks: here one waits on a table lock.
        with psycopg.connect(postgres.dsn) as locker:
            locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(Transient, match="statement timeout"):
                sink.upsert(make_points(2, dim=8, seed=1))
            assert time.monotonic() - started < 2  # the server's cancel (1 s), before the watchdog (2 s)
            locker.rollback()
        assert direct.count() == 6
    finally:
        proxy.delete()
        sink.close()
        direct.close()
