"""The test servers' fault operations (tests/support/services.py: kill, terminate, pause/resume, restart,
alive, paused) against the session's real Kafka broker and MinIO server.

The servers are the session's, shared with every other test: the ``broker`` and ``s3`` fixtures leave them
running, unpaused and serving after each test, pass or fail. On the container backend kill/terminate/restart
raise NotImplementedError (the tests check that instead); pause/resume run on both backends.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import uuid

import pytest

import services

KILLS = ["kill", "terminate"]


def _restore(server) -> None:
    if server.paused:
        server.resume()
    if not server.alive:
        server.restart()


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


def _accepted(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _container_refuses(server, op: str) -> None:
    with pytest.raises(NotImplementedError, match="same port"):
        getattr(server, op)()
    assert server.alive


# ---- Kafka ----------------------------------------------------------------------------------------

@pytest.fixture
def broker(kafka):
    yield kafka
    _restore(kafka)
    from confluent_kafka.admin import AdminClient

    assert AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=30).brokers


def new_topic(broker) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"faults-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})  # alive until the result is in
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    return topic


def produce(broker, topic: str, values: list[bytes], timeout: float = 30, **conf) -> tuple[int, list]:
    """(records still queued after flush(timeout), each delivery's error: None when delivered)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", **conf})
    errors: list = []
    for value in values:
        producer.produce(topic, value, on_delivery=lambda err, msg: errors.append(err))
    return producer.flush(timeout), errors


def read(broker, topic: str, group: str | None = None, timeout: float = 60) -> list[bytes]:
    """Partition 0 up to its end: from the beginning, or from ``group``'s committed offset."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group or f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "auto.offset.reset": "earliest"})
    try:
        consumer.assign([TopicPartition(topic, 0) if group else TopicPartition(topic, 0, OFFSET_BEGINNING)])
        values: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(1)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return values
                raise AssertionError(msg.error())
            values.append(msg.value())
        raise AssertionError(f"end of {topic}[0] not reached in {timeout}s ({len(values)} records read)")
    finally:
        consumer.close()


def commit(broker, topic: str, group: str, offset: int) -> None:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    finally:
        consumer.close()


def committed(broker, topic: str, group: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, 0)], timeout=30)
        assert tp.error is None, tp.error
        return tp.offset
    finally:
        consumer.close()


def cluster_id(broker) -> str:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=30).cluster_id


@pytest.mark.parametrize("fault", KILLS)
def test_kafka_records_offsets_and_cluster_id_survive_a_restart(broker, fault):
    from confluent_kafka import KafkaError

    if broker.backend != "native":
        _container_refuses(broker, fault)
        _container_refuses(broker, "restart")
        return
    topic, group = new_topic(broker), f"faults-{uuid.uuid4().hex[:8]}"
    first = [f"first-{i}".encode() for i in range(5)]
    assert produce(broker, topic, first) == (0, [None] * 5)
    commit(broker, topic, group, 3)
    assert committed(broker, topic, group) == 3
    cid = cluster_id(broker)
    assert cid == broker.cluster_id
    port, bootstrap, logs = broker.port, broker.bootstrap, broker.dir / "data"

    getattr(broker, fault)()
    assert not broker.alive and not broker.paused
    assert _refused(port) and _refused(broker.controller_port)
    assert (logs / f"{topic}-0").is_dir() and (logs / "meta.properties").is_file()
    left, errors = produce(broker, topic, [b"lost"], timeout=20, **{"message.timeout.ms": 1500})
    assert left == 0 and [e.code() for e in errors] == [KafkaError._MSG_TIMED_OUT]

    started = time.monotonic()
    assert broker.restart() is broker
    print(f"Kafka restart after {fault}(): {time.monotonic() - started:.1f} s")
    assert broker.alive and not broker.paused
    assert (broker.port, broker.bootstrap) == (port, bootstrap)
    assert cluster_id(broker) == cid
    assert read(broker, topic) == first  # exactly the 5: "lost" never reached the broker
    assert committed(broker, topic, group) == 3
    second = [f"second-{i}".encode() for i in range(5)]
    assert produce(broker, topic, second) == (0, [None] * 5)
    assert read(broker, topic) == first + second
    assert read(broker, topic, group) == (first + second)[3:]  # the group resumes at its committed offset


def test_kafka_pause_hangs_a_produce_until_resume(broker):
    from confluent_kafka import Producer

    topic = new_topic(broker)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "message.timeout.ms": 60000})
    errors: list = []
    producer.produce(topic, b"before", on_delivery=lambda err, msg: errors.append(err))
    assert producer.flush(30) == 0 and errors == [None]  # connected, metadata known

    broker.pause()
    try:
        assert broker.alive and broker.paused
        assert _accepted(broker.port)  # the kernel still accepts into the listen backlog
        producer.produce(topic, b"during", on_delivery=lambda err, msg: errors.append(err))
        started = time.monotonic()
        assert producer.flush(2) == 1  # not delivered, not failed: the broker hangs
        assert time.monotonic() - started >= 1.9 and errors == [None]
    finally:
        broker.resume()
    assert broker.alive and not broker.paused
    assert producer.flush(30) == 0 and errors == [None, None]
    assert read(broker, topic) == [b"before", b"during"]


def test_kafka_restart_of_a_running_broker_is_a_clean_restart(broker):
    if broker.backend != "native":
        return _container_refuses(broker, "restart")
    topic = new_topic(broker)
    assert produce(broker, topic, [b"one"]) == (0, [None])
    pid = broker.proc.pid
    broker.restart()
    assert broker.alive and broker.proc.pid != pid
    assert read(broker, topic) == [b"one"]


# ---- MinIO ----------------------------------------------------------------------------------------

@pytest.fixture
def s3(minio):
    yield minio
    _restore(minio)
    minio.client().list_buckets()


def quick_client(server, read_timeout: float = 5):
    """One attempt, short timeouts: a failure shows at once, not after the default retries."""
    import boto3
    from botocore.config import Config

    e = server.env
    return boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], region_name=e["AWS_REGION"],
                        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2,
                                      read_timeout=read_timeout))


def put_one(server) -> tuple[str, bytes, str]:
    bucket = server.create_bucket(f"faults-{uuid.uuid4().hex[:8]}")
    body = os.urandom(3 * 2**20 + 7)  # several parts' worth, odd size
    etag = server.client().put_object(Bucket=bucket, Key="obj/a.bin", Body=body)["ETag"]
    return bucket, body, etag


@pytest.mark.parametrize("fault", [*KILLS, "pause-then-kill", "none"])
def test_minio_objects_survive_a_restart(s3, fault):
    from botocore.exceptions import EndpointConnectionError

    if s3.backend != "native":
        _container_refuses(s3, "restart" if fault == "none" else fault.rpartition("-")[2])
        return
    bucket, body, etag = put_one(s3)
    port, endpoint, data = s3.port, s3.endpoint, s3.dir / "data"

    if fault == "pause-then-kill":
        s3.pause()
        assert s3.paused
        s3.kill()
    elif fault != "none":
        getattr(s3, fault)()
    if fault != "none":
        assert not s3.alive and not s3.paused and _refused(port)
        assert (data / bucket).is_dir()
        with pytest.raises(EndpointConnectionError):
            quick_client(s3).get_object(Bucket=bucket, Key="obj/a.bin")

    assert s3.restart() is s3
    assert s3.alive and (s3.port, s3.endpoint) == (port, endpoint)
    client = quick_client(s3)
    client.head_bucket(Bucket=bucket)
    got = client.get_object(Bucket=bucket, Key="obj/a.bin")
    assert got["ETag"] == etag and got["Body"].read() == body
    client.put_object(Bucket=bucket, Key="obj/b.bin", Body=b"after")
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["obj/a.bin", "obj/b.bin"]
    assert client.get_object(Bucket=bucket, Key="obj/b.bin")["Body"].read() == b"after"


def test_minio_restart_waits_out_a_port_held_by_another_socket(s3):
    """A bind that fails (address already in use) is retried until the port is free, within restart's bound."""
    if s3.backend != "native":
        return _container_refuses(s3, "kill")
    bucket, body, _etag = put_one(s3)
    s3.kill()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", s3.port))
    blocker.listen()
    hold = 2.0
    timer = threading.Timer(hold, blocker.close)
    log_before = (s3.dir / "minio.log").stat().st_size
    started = time.monotonic()
    timer.start()
    try:
        s3.restart()
    finally:
        timer.cancel()
        blocker.close()
    assert time.monotonic() - started >= hold - 0.2
    with (s3.dir / "minio.log").open("rb") as log:
        log.seek(log_before)
        assert b"already in use" in log.read()
    assert quick_client(s3).get_object(Bucket=bucket, Key="obj/a.bin")["Body"].read() == body


def test_minio_pause_hangs_requests_until_resume(s3):
    from botocore.exceptions import ReadTimeoutError

    bucket, body, _etag = put_one(s3)
    s3.pause()
    try:
        assert s3.alive and s3.paused
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):  # connected (listen backlog), no answer
            quick_client(s3, read_timeout=2).get_object(Bucket=bucket, Key="obj/a.bin")
        assert time.monotonic() - started >= 1.9
    finally:
        s3.resume()
    assert s3.alive and not s3.paused
    client = quick_client(s3)
    assert client.get_object(Bucket=bucket, Key="obj/a.bin")["Body"].read() == body
    client.put_object(Bucket=bucket, Key="obj/b.bin", Body=b"after")
    assert client.get_object(Bucket=bucket, Key="obj/b.bin")["Body"].read() == b"after"


# ---- without a running server --------------------------------------------------------------------

@pytest.mark.parametrize("cls", [services.KafkaBroker, services.MinioServer])
def test_native_faults_need_a_started_server_and_not_after_stop(cls):
    server = cls()
    assert not server.alive and not server.paused
    for op in ("kill", "terminate", "pause", "resume", "restart"):
        with pytest.raises(RuntimeError, match="never started"):
            getattr(server, op)()
    server.stop()
    for op in ("kill", "restart"):
        with pytest.raises(RuntimeError, match=r"stopped for good \(stop\(\) removed its data directory\)"):
            getattr(server, op)()


@pytest.mark.parametrize("cls", [services.KafkaContainerBroker, services.MinioContainerServer])
def test_container_faults_without_docker(cls):
    """Built without contacting Docker: kill/terminate/restart refuse at once and say why; pause and
    resume need a started container."""
    server = cls()
    assert not server.alive and not server.paused
    for op in ("kill", "terminate", "restart"):
        with pytest.raises(NotImplementedError, match=f"{services.SERVICES_ENV}=native") as e:
            getattr(server, op)()
        assert str(e.value).startswith(f"{op}() is not available on the container backend")
    for op in ("pause", "resume"):
        with pytest.raises(RuntimeError, match="not started"):
            getattr(server, op)()


def test_interface_lists_the_faults_on_both_backends():
    for name in ("kafka", "minio"):
        assert set(services.FAULTS) <= set(services.INTERFACE[name])
        for cls in (services.NATIVE[name], services.CONTAINERS[name]):
            for op in services.FAULTS:
                assert hasattr(cls, op), (cls, op)
