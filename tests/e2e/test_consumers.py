"""End to end: the publisher on the tiny model -> Kafka + MinIO -> ``vllm-mm-events consume``
-> every vector store; then the consumer's semantics on those same engine events: crash and
replay, poison records, two consumers in one group, SIGTERM, metrics."""

from __future__ import annotations

import json
import signal
import uuid

import pytest

from consumers.sinks import open_vector_sink
from publisher.stores.s3 import S3Store
from schemas.codec import AvroCodec, to_wire

import consumer_run as cr
import synth
from pipeline import N_EVENTS, N_POINTS, all_ids, source

pytestmark = pytest.mark.e2e

# The engine's events (8 requests, 9 media items) come from the session fixture ``published``
# (tests/e2e/conftest.py, tests/support/pipeline.py), shared with test_consumer_faults.py.


def test_index_into_every_sink_and_search_finds_the_image(published, kafka, postgres, consumer_env, tmp_path):
    sinks = [f"qdrant://{tmp_path}/qdrant/images", postgres.uri("images_e2e"), f"milvus://{tmp_path}/m.db/images",
             f"lancedb://{tmp_path}/lance/images"]
    args = ["--source", source(kafka, published["topic"]), "--group", "e2e-" + uuid.uuid4().hex[:6]]
    for s in sinks:
        args += ["--sink", s]
    summary, log = cr.consume_once(args, consumer_env)
    assert summary == {"consumed": N_EVENTS, "indexed": N_POINTS, "committed": N_EVENTS, "dead_lettered": {}}

    # The image seen only once (seed 23): its own stored embedding finds its request first, in every store.
    r23 = next(r for r in published["results"] if r["images"] == [23])
    uri23 = r23["ec_transfer_params"]["mm_embeddings"][0]["uri"]
    event23 = next(e for e in published["events"] if e["request_id"] == r23["request_id"])
    fetched = S3Store(published["bucket"], consumer_env["AWS_ENDPOINT_URL"], "us-east-1").get(
        uri23.split("/", 3)[3])
    from consumers.vectors import pool
    from schemas.objects import read_object

    query = pool(read_object(fetched).to_float32(), "mean", False)
    for uri in sinks:
        sink = open_vector_sink(uri)
        assert sink.count() == N_POINTS, uri
        hits = sink.search(query, k=3)
        assert hits[0].payload["request_id"] == r23["request_id"], (uri, hits)
        assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[1].score < hits[0].score
        p = hits[0].payload
        assert p["event_id"] == event23["event_id"] and p["uri"] == uri23 and p["modality"] == "image"
        assert p["metadata"] == {"tenant": "acme"} and p["pooling"] == "mean"
        assert p["event_time"] == int(event23["event_time"].timestamp() * 1000)
        got = sink.retrieve(sorted(all_ids(published["events"])))
        assert len(got) == N_POINTS  # ids are derived from (event_id, item_index), as the README says
        sink.close()

    # The same through the command line, as a person would check.
    p = cr.run_cli(["search", "--sink", sinks[0], "--like", uri23, "-k", "3", "--json"], consumer_env)
    assert p.returncode == 0, p.stderr
    first = json.loads(p.stdout.splitlines()[0])
    assert first["request_id"] == r23["request_id"] and first["score"] == pytest.approx(1.0, abs=1e-4)


def test_crash_between_write_and_commit_then_replay(published, kafka, consumer_env, tmp_path):
    group, sink_uri = "crash-" + uuid.uuid4().hex[:6], f"lancedb://{tmp_path}/lance/crash"
    args = ["--source", source(kafka, published["topic"]), "--group", group, "--sink", sink_uri,
            "--batch-max-records", "3", "--batch-linger-ms", "10000"]
    # A process that dies never leaves its group: a short session lets the restart take the partitions soon.
    consumer_env = {**consumer_env, "VLLM_MM_EVENTS_KAFKA__SESSION_TIMEOUT_MS": "6000"}
    # The second batch is written to the sink, then the process dies before committing it.
    p = cr.run_cli(["consume", "--once", "--metrics-port", "0", *args],
                   {**consumer_env, "VLLM_MM_EVENTS_CONSUMER_CRASH_AFTER_WRITE": "2"})
    assert p.returncode == 86, p.stderr[-3000:]
    offsets = cr.committed(kafka.bootstrap, group, published["topic"], 3)
    assert sum(o for o in offsets.values() if o > 0) == 3  # only the first batch was committed
    sink = open_vector_sink(sink_uri)
    written = {pl["event_id"] for pl in sink.retrieve(sorted(all_ids(published["events"]))).values()}
    assert len(written) == 6  # two batches of 3 events reached the sink
    before = sink.count()
    sink.close()

    summary, _ = cr.consume_once(args, consumer_env)
    assert summary["consumed"] == N_EVENTS - 3  # the uncommitted batch is read again, plus the rest
    assert summary["committed"] == N_EVENTS - 3 and summary["dead_lettered"] == {}
    sink = open_vector_sink(sink_uri)
    assert sink.count() == N_POINTS > before  # replayed points were rewritten, not duplicated
    assert set(sink.retrieve(sorted(all_ids(published["events"])))) == all_ids(published["events"])
    sink.close()
    assert sum(cr.committed(kafka.bootstrap, group, published["topic"], 3).values()) == N_EVENTS


def test_poison_records_go_to_the_dlq_and_the_next_good_one_is_indexed(published, kafka, minio, consumer_env,
                                                                      tmp_path):
    codec = AvroCodec()
    good = [(published["keys"][i], published["values"][i]) for i in range(6)]
    ev = [codec.decode(v) for _, v in good]

    def altered(event, **item_changes):
        e = to_wire(event)
        e["embeddings"][0].update(item_changes)
        return codec.encode(e)

    wrong_fp = bytearray(good[0][1])
    wrong_fp[2:10] = b"\x01" * 8
    store = S3Store(published["bucket"], minio.endpoint, "us-east-1")
    narrow, _ = synth.make_event(store, "synth", "req-narrow", [synth.features(7, n=3, dim=8)])
    poison = [
        ("undecodable", good[0][1][:10] + b"\xff\xff\xff\xff not an event body"),  # right header, bad body
        ("unknown_schema", bytes(wrong_fp)),
        ("missing_object", altered(ev[1], uri=ev[1]["embeddings"][0]["uri"].replace("/emb/", "/nowhere/"))),
        ("checksum_mismatch", altered(ev[2], sha256="0" * 64)),
        ("dimension_mismatch", codec.encode(narrow)),
    ]
    # good0, poison0, good1, poison1, ... good5 on one partition, so the order is known.
    records, expect_offsets = [], {}
    for i in range(6):
        records.append((good[i][0], good[i][1], 0))
        if i < len(poison):
            expect_offsets[poison[i][0]] = len(records)
            records.append((b"bad-" + str(i).encode(), poison[i][1], 0))
    topic = f"poison.{uuid.uuid4().hex[:6]}"
    cr.create_topic(kafka.bootstrap, topic, 1)
    cr.produce(kafka.bootstrap, topic, records)

    sink_uri = f"qdrant://{tmp_path}/q/poison"
    summary, log = cr.consume_once(["--source", source(kafka, topic), "--group", "poison", "--sink", sink_uri,
                                    "--batch-max-records", "4"], consumer_env)
    assert summary["dead_lettered"] == {kind: 1 for kind, _ in poison}, (summary, log[-3000:])
    assert summary["consumed"] == summary["committed"] == len(records)

    sink = open_vector_sink(sink_uri)
    good_ids = all_ids(ev)
    assert sink.count() == len(good_ids)
    assert set(sink.retrieve(sorted(good_ids))) == good_ids
    sink.close()

    dlq = consume_raw(kafka.bootstrap, f"{topic}.dlq", expected=len(poison))
    dlq.sort(key=lambda r: int(r[0]["dlq.source.offset"]))  # the DLQ topic has several partitions
    assert [h["dlq.reason"] for h, _, _ in dlq] == [k for k, _ in poison]
    for (h, key, value), (kind, original) in zip(dlq, poison):
        assert value == original and key.startswith(b"bad-")  # the record itself, untouched
        assert h["dlq.source.topic"] == topic and h["dlq.source.partition"] == "0"
        assert int(h["dlq.source.offset"]) == expect_offsets[kind]
        assert h["dlq.consumer.group"] == "poison" and h["dlq.error"]
    dim = ev[0]["embeddings"][0]["shape"][1]
    assert f"holds {dim}-d vectors; this embedding is 8-d" in dict((h["dlq.reason"], h["dlq.error"])
                                                               for h, _, _ in dlq)["dimension_mismatch"]


def consume_raw(bootstrap, topic, expected, timeout=30):
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    out = []
    try:
        cr.wait_for(lambda: _drain(c, out) >= expected, timeout, f"{expected} records on {topic}", interval=0)
    finally:
        c.close()
    return out


def _drain(c, out):
    m = c.poll(0.5)
    if m is not None and not m.error():
        out.append(({k: v.decode() for k, v in m.headers() or []}, m.key(), m.value()))
    return len(out)


def test_two_consumers_split_partitions_and_stop_cleanly_on_sigterm(published, kafka, postgres, consumer_env,
                                                                    tmp_path):
    from services import free_port

    codec = AvroCodec()
    topic = f"group.{uuid.uuid4().hex[:6]}"
    cr.create_topic(kafka.bootstrap, topic, 3)
    copies = []  # 3 copies of every engine event, each a distinct event, spread over the 3 partitions
    for c in range(3):
        for i, v in enumerate(published["values"]):
            e = to_wire(codec.decode(v))
            e["event_id"] = str(uuid.uuid4())
            copies.append((e, (c * N_EVENTS + i) % 3))
    expected_points = len(all_ids([e for e, _ in copies]))

    table, group = "group_" + uuid.uuid4().hex[:6], "group-" + uuid.uuid4().hex[:6]
    ports = [free_port(), free_port()]
    procs = [cr.start(["--source", source(kafka, topic), "--group", group, "--sink", postgres.uri(table),
                       "--metrics-port", str(port), "--batch-linger-ms", "50", "--log-format", "json"],
                      consumer_env, tmp_path / f"c{i}.log") for i, port in enumerate(ports)]
    try:
        def split():  # both joined the group and hold disjoint, non-empty shares of the 3 partitions
            owned = [cr.last_assignment((tmp_path / f"c{i}.log").read_text()) for i in range(2)]
            return owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == {0, 1, 2}
        logs = [tmp_path / f"c{i}.log" for i in range(2)]
        cr.wait_for(split, 90, "the two consumers to share the partitions", logs=logs)
        cr.produce(kafka.bootstrap, topic, [(e["request_id"].encode(), codec.encode(e), p) for e, p in copies])

        def indexed():
            try:
                s = open_vector_sink(postgres.uri(table))
                n = s.count() if s.describe() else 0
                s.close()
                return n == expected_points
            except Exception:  # noqa: BLE001 - the table may not exist yet
                return False

        cr.wait_for(indexed, 120, f"{expected_points} rows in {table}", logs=logs)

        def both_busy():  # each process took partitions and consumed events
            scraped = [cr.scrape(p) for p in ports]
            counts = [cr.metric(t, "vllm_mm_events_consumer_events_consumed_total") for _, t in scraped]
            return all(c > 0 for c in counts) and sum(counts) >= len(copies) and counts
        counts = cr.wait_for(both_busy, 60, "both consumers to have consumed events")
        for p in ports:
            status, body = cr.scrape(p, "/healthz")
            assert status == 200 and "loop_age_s" in body
        metrics = cr.scrape(ports[0])[1]
        assert "vllm_mm_events_consumer_batch_seconds_bucket" in metrics
        assert "vllm_mm_events_consumer_points_indexed_total{sink=" in metrics
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    summaries = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert all(s["consumed"] > 0 and s["committed"] > 0 for s in summaries)
    owned = [cr.last_assignment((tmp_path / f"c{i}.log").read_text()) for i in range(2)]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == {0, 1, 2}, owned
    assert sum(cr.committed(kafka.bootstrap, group, topic, 3).values()) == len(copies)
    assert counts  # both processes reported consumption through /metrics

