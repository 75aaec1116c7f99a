"""Fault test: the consumer SIGKILLed mid-stream, several times, then restarted; every sink ends with exactly
one point per (event, item): none missing, none doubled.

The events are the real engine's (the session fixture ``published``: 8 events, 9 media items, 3 partitions),
read straight from the topic the publisher wrote, each record once. Copying the records into a longer topic
would give more room to kill in, but a copy of an event collapses onto the same point ids, so a record the
consumer skipped after a kill (committed, never written) would be hidden by its copy. With each record once,
every point has exactly one record that can put it there: a skipped record shows as a missing point, and a
replayed one (written, killed before its commit, read again) must rewrite its points, not add to them.

To be mid-stream with only 8 records, batches hold one record each (``--batch-max-records 1``). Each run is
killed once it has committed something new and, preferably, while a batch is written but not committed:
pgvector is the first sink written, so the test sees a batch's points there before its offsets are committed,
and the kill lands while the other three sinks are being written or just after. The next run replays it.

One consumer process writes four sinks at once (``--sink`` repeated): pgvector on the real PostgreSQL, LanceDB
and Milvus Lite (embedded, in files), and Qdrant local mode. The whole process group is killed, as a pod is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from consumers.sinks import open_vector_sink
from consumers.vectors import point_id
from schemas.codec import AvroCodec, to_wire

import consumer_run as cr
from pipeline import N_EVENTS, N_POINTS, PARTITIONS, all_ids, source

pytestmark = pytest.mark.e2e

KILLS = 3
# A SIGKILLed member never leaves its group: the next process's join waits for its session to expire.
# 6 s is the broker's smallest (group.min.session.timeout.ms); the default 45 s would make this test minutes.
SESSION_TIMEOUT_MS = 6000


class GroupOffsets:
    """The group's committed offsets, read by a client that never joins the group (cheap to poll)."""

    def __init__(self, bootstrap: str, group: str, topic: str):
        from confluent_kafka import Consumer, TopicPartition

        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        self.tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.ends = {tp.partition: self.c.get_watermark_offsets(tp, timeout=10)[1] for tp in self.tps}
        self.total = sum(self.ends.values())

    def committed(self) -> dict[int, int]:
        from confluent_kafka import KafkaError, KafkaException

        passing = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                   KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TIMED_OUT, KafkaError._TRANSPORT}
        for attempt in range(50):  # the group's coordinator may be loading or moving: retried, bounded
            try:
                return {tp.partition: max(tp.offset, 0) for tp in self.c.committed(self.tps, timeout=10)}
            except KafkaException as e:
                if attempt == 49 or not (e.args[0].retriable() or e.args[0].code() in passing):
                    raise
                time.sleep(0.1)

    def done(self) -> int:
        return sum(self.committed().values())

    def settled(self) -> int:
        """After a kill: the count once two reads 0.2 s apart agree (a commit sent just before the kill may land)."""
        last = [self.done()]

        def same():
            n = self.done()
            ok, last[0] = n == last[0], n
            return ok
        cr.wait_for(same, 10, "the committed offsets to settle", interval=0.2)
        return last[0]

    def close(self) -> None:
        self.c.close()


def dlq_records(bootstrap: str, topic: str) -> int:
    """Records in the dead-letter topic; 0 if nothing ever made it exist."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}"})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return 0
        return sum(hi - lo for lo, hi in (c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                                          for p in md.partitions))
    finally:
        c.close()


def points_of(published, committed: dict[int, int], before: bool) -> int:
    """Points of the events whose record is before (or at/after) the committed offset of its partition."""
    return sum(len(e["embeddings"]) for e, (p, off) in zip(published["events"], published["positions"])
               if (off < committed[p]) == before)


class PgPoints:
    """How many points the pgvector table holds, on one connection (cheap to poll); 0 before it exists."""

    def __init__(self, uri: str):
        self.sink = open_vector_sink(uri)

    def count(self) -> int:
        return self.sink.count() if self.sink.describe() else 0

    def close(self) -> None:
        self.sink.close()


def test_sigkill_mid_stream_three_times_then_restart_leaves_one_point_per_item(published, kafka, postgres,
                                                                             consumer_env, tmp_path):
    t0 = time.monotonic()
    topic, tag = published["topic"], uuid.uuid4().hex[:6]
    group, dlq = f"kill-{tag}", f"kill.{tag}.dlq"
    # pgvector first: a batch is written to the sinks in this order, so between its pgvector write and its
    # commit the other three are written; a kill there leaves the batch in some sinks, uncommitted.
    sinks = {"pgvector": postgres.uri(f"kill_{tag}"), "lancedb": f"lancedb://{tmp_path}/lance/kill",
             "qdrant": f"qdrant://{tmp_path}/qdrant/kill", "milvus": f"milvus://{tmp_path}/milvus.db/kill"}
    args = ["--source", source(kafka, topic), "--group", group, "--dlq", f"kafka://{kafka.bootstrap}/{dlq}",
            "--batch-max-records", "1", "--batch-linger-ms", "0", "--metrics-port", "0"]
    for uri in sinks.values():
        args += ["--sink", uri]
    env = {**consumer_env, "VLLM_MM_EVENTS_KAFKA__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS)}
    expected = all_ids(published["events"])
    assert len(expected) == N_POINTS

    offsets, pg = GroupOffsets(kafka.bootstrap, group, topic), PgPoints(sinks["pgvector"])
    assert offsets.total == N_EVENTS, offsets.ends
    kills = []  # per kill: events committed, points of uncommitted events already written (replayed next run)
    try:
        prev = 0
        for k in range(1, KILLS + 1):
            log_path = tmp_path / f"run{k}.log"
            with log_path.open("w") as log:  # a long-running consumer, as deployed; its own process group
                proc = subprocess.Popen([cr.CLI, "consume", *args], env=dict(os.environ, **env), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            # Kill it in the window between a batch's writes and its commit: it committed something new, and
            # pgvector (written first) holds points of events not committed yet. If that window is missed until
            # only enough events are left for the later runs, kill it anyway: still mid-stream.
            last_chance = N_EVENTS - (KILLS - k) - 1
            try:
                def kill_point(proc=proc, prev=prev, log_path=log_path, k=k, last_chance=last_chance):
                    if proc.poll() is not None:
                        raise AssertionError(f"run {k}: the consumer exited {proc.returncode} before it was "
                                             f"killed:\n{log_path.read_text()[-4000:]}")
                    committed = offsets.committed()
                    done = sum(committed.values())
                    if done == N_EVENTS:
                        raise AssertionError(f"run {k} committed every event before it could be killed")
                    return done > prev and (done >= last_chance or pg.count() > points_of(published, committed, True))
                cr.wait_for(kill_point, 180, f"run {k} to commit past {prev} of {N_EVENTS} events and write the "
                            "next batch", interval=0.005)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # the consumer and anything it started
                proc.wait(30)
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, log_path.read_text()[-4000:])
            done = offsets.settled()
            assert prev < done < N_EVENTS, (f"run {k} was not killed mid-stream: committed {prev} -> {done} "
                                            f"of {N_EVENTS}")
            unacked = pg.count() - points_of(published, offsets.committed(), True)
            kills.append((done, unacked))
            print(f"kill {k}: committed {done}/{N_EVENTS} events; pgvector holds {unacked} point(s) of events "
                  "written, not committed")
            prev = done
        # At least one kill hit a batch between its writes and its commit, so its replay had points to double.
        assert any(unacked > 0 for _, unacked in kills), kills

        # Restart and let it finish: it resumes at the committed offsets and reads (at least) every event after
        # them. Reading one again is at-least-once and allowed; the sinks below show whether it doubled anything.
        start_at = offsets.committed()
        summary, run_log = cr.consume_once(args, env, timeout=300)
        (tmp_path / "final.log").write_text(run_log)
        assert summary["dead_lettered"] == {}, (summary, run_log[-4000:])
        assert summary["consumed"] == summary["committed"] >= N_EVENTS - prev, (summary, start_at)
        assert summary["indexed"] >= points_of(published, start_at, False), (summary, start_at)
        reread = summary["consumed"] - (N_EVENTS - prev)

        final = cr.committed(kafka.bootstrap, group, topic, PARTITIONS)
        assert final == offsets.ends, f"the group's committed offsets {final} do not cover the topic {offsets.ends}"
    finally:
        offsets.close()
        pg.close()
    assert dlq_records(kafka.bootstrap, dlq) == 0

    for name, uri in sinks.items():
        sink = open_vector_sink(uri)
        try:
            n = sink.count()
            # One id at a time: a retrieve of many ids may stop at as many rows, and duplicates would crowd out
            # other ids (LanceDB's takes ``limit(len(ids))`` rows).
            got = {pid: payload for i in sorted(expected) for pid, payload in sink.retrieve([i]).items()}
        finally:
            sink.close()
        missing = expected - set(got)
        doubled = n - len(got)  # rows beyond one per expected point: duplicates, or ids that should not exist
        print(f"[{name}] kills={len(kills)} events={N_EVENTS} points={n} missing={len(missing)} doubled={doubled}")
        assert not missing and doubled == 0 and n == N_POINTS, (name, n, sorted(missing))
        for pid, payload in got.items():  # each point is the item it claims to be
            assert point_id(payload["event_id"], payload["item_index"]) == pid, (name, pid, payload)
    print(f"kills={len(kills)} committed-at-kill={[d for d, _ in kills]} "
          f"written-uncommitted-at-kill={[u for _, u in kills]} final-run={summary} reread={reread} "
          f"wall={time.monotonic() - t0:.1f}s")


def test_a_rebalance_while_the_sink_is_down_moves_partitions_at_once_and_loses_nothing(
        published, kafka, postgres, toxiproxy, consumer_env, tmp_path):
    """One consumer's path to its sink is down: its writer retries a batch, and the next batch waits for the
    writer (the partitions paused, still polled); a second consumer joins the group. The first gives the batch
    up at the rebalance, rather than holding the whole group's rebalance (and its own loop) for as long as the
    outage lasts: the newcomer gets its partitions and indexes them while the outage goes on. Once the path
    heals, the first writes the events of the partitions it kept, which went back to the head of its queue.
    The table ends with one row per point, and the group's offsets at the topic's end. Through the outage the
    first stays healthy (``/healthz``): it keeps trying, and a restart would not bring the sink back."""
    from services import free_port

    codec = AvroCodec()
    tag = uuid.uuid4().hex[:6]
    topic, table = f"revoke.{tag}", f"revoke_{tag}"
    cr.create_topic(kafka.bootstrap, topic, PARTITIONS)
    copies = []  # 4 copies of every engine event, each a distinct event (its own points), over the partitions
    for c in range(4):
        for i, v in enumerate(published["values"]):
            e = to_wire(codec.decode(v))
            e["event_id"] = str(uuid.uuid4())
            copies.append((e, (c * N_EVENTS + i) % PARTITIONS))
    expected = len(all_ids([e for e, _ in copies]))
    proxy = toxiproxy.proxy(f"pg-{tag}", f"{postgres.host}:{postgres.port}")
    # Two batches of 16 (closed by count: the linger outlasts the produce). The first, given up, holds
    # events of at least two partitions, so of one that stays: only one of the three moves.
    common = ["--source", source(kafka, topic), "--group", f"revoke-{tag}", "--batch-max-records", "16",
              "--batch-linger-ms", "2000", "--log-format", "json"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    port, stall_s = free_port(), 5
    procs = [cr.start([*common, "--sink", postgres.uri(table).replace(f":{postgres.port}/", f":{proxy.port}/"),
                       "--metrics-port", str(port)],
                      {**consumer_env, "VLLM_MM_EVENTS_STALL_TIMEOUT_S": str(stall_s)}, logs[0])]
    pg = PgPoints(postgres.uri(table))
    try:
        cr.wait_for(lambda: cr.last_assignment(logs[0].read_text()) == {0, 1, 2}, 60,
                    "the first consumer to own every partition", logs=logs)
        proxy.set_enabled(False)  # connections refused: the writer retries, backing off
        cr.produce(kafka.bootstrap, topic, [(e["request_id"].encode(), codec.encode(e), p) for e, p in copies])
        cr.wait_for(lambda: "retrying in" in logs[0].read_text(), 60, "the first consumer's writer to retry",
                    logs=logs)

        procs.append(cr.start([*common, "--sink", postgres.uri(table), "--metrics-port", "0"], consumer_env, logs[1]))
        joined = time.monotonic()

        def split():
            owned = [cr.last_assignment(p.read_text()) for p in logs]
            ok = owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == {0, 1, 2}
            return ok and owned
        # Before: the first consumer's revoke waited on its writer, so nothing moved until the outage ended.
        owned = cr.wait_for(split, 60, "the partitions to be split while the sink is down", logs=logs)
        print(f"partitions split {time.monotonic() - joined:.1f} s after the second consumer started: {owned}")
        theirs = len(all_ids([e for e, p in copies if p in owned[1]]))
        cr.wait_for(lambda: pg.count() == theirs, 60, f"the second consumer's {theirs} points", logs=logs)
        time.sleep(2)
        assert pg.count() == theirs  # nothing of the first's partitions while its sink is down
        first = logs[0].read_text()
        assert "rebalance: gave up a batch" in first and "go out again first" in first, first[-4000:]

        def healthy_through_the_outage():  # uncommitted longer than stall_timeout_s, and still 200
            status, body = cr.scrape(port, "/healthz")
            return status == 200 and json.loads(body)["uncommitted_work_age_s"] > stall_s
        cr.wait_for(healthy_through_the_outage, 30, f"/healthz 200 with work uncommitted past {stall_s} s",
                    interval=0.2, logs=logs)
        for _ in range(30):  # and it stays so, between tries as they back off
            status, body = cr.scrape(port, "/healthz")
            assert status == 200, body
            time.sleep(0.25)

        proxy.set_enabled(True)
        cr.wait_for(lambda: pg.count() == expected, 90, f"all {expected} points", logs=logs)
        cr.wait_for(lambda: cr.committed(kafka.bootstrap, f"revoke-{tag}", topic, PARTITIONS)
                    == {p: sum(1 for _, q in copies if q == p) for p in range(PARTITIONS)}, 30,
                    "the group's offsets to reach the topic's end", logs=logs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=60)[0] for p in procs]
        proxy.delete()
    assert [p.returncode for p in procs] == [0, 0], [p.read_text()[-3000:] for p in logs]
    summaries = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert all(s["dead_lettered"] == {} for s in summaries), summaries
    # Exactly one row per point: the batch given up and written again rewrote the same ids.
    assert pg.count() == expected
    pg.close()


def test_a_sink_refusing_the_consumer_itself_is_retried_until_granted_never_dead_lettered(
        published, kafka, postgres, consumer_env, tmp_path):
    """The consumer's PostgreSQL role may not create its table (PostgreSQL 15+ grants CREATE on ``public``
    to no one by default): the server refuses the client, not the data, and would refuse every event alike.
    Nothing is dead-lettered or committed while the refusal lasts (the writer retries, counted by kind);
    once the grant is made, every point is written and the group's offsets reach the topic's end."""
    import psycopg

    from services import PG_USER, free_port

    tag = uuid.uuid4().hex[:6]
    role, table, group, dlq = f"limited_{tag}", f"refused_{tag}", f"refused-{tag}", f"refused-{tag}.dlq"
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute("CREATE EXTENSION IF NOT EXISTS vector")
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'limited-secret'")
        assert admin.execute("SELECT has_schema_privilege(%s, 'public', 'CREATE')", (role,)).fetchone() == (False,)
        port = free_port()
        log = tmp_path / "consumer.log"
        proc = cr.start(["--source", source(kafka, published["topic"]), "--group", group,
                         "--dlq", f"kafka://{kafka.bootstrap}/{dlq}", "--metrics-port", str(port),
                         "--sink", postgres.uri(table).replace(f"//{PG_USER}@", f"//{role}@")],
                        {**consumer_env, "PGPASSWORD": "limited-secret"}, log)
        pg = PgPoints(postgres.uri(table))
        offsets = GroupOffsets(kafka.bootstrap, group, published["topic"])
        try:
            # Before: the refusal was taken for the data's, each event dead-lettered alone, the batch committed.
            cr.wait_for(lambda: "retrying in" in log.read_text() or "dead-lettered" in log.read_text(), 90,
                        "the first write to be refused", logs=[log])
            time.sleep(3)
            assert dlq_records(kafka.bootstrap, dlq) == 0 and offsets.done() == 0, log.read_text()[-3000:]
            assert "permission denied" in log.read_text()
            assert cr.metric(cr.scrape(port)[1], 'vllm_mm_events_consumer_errors_total{kind="sink"}') > 0

            admin.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
            cr.wait_for(lambda: pg.count() == N_POINTS, 90, f"all {N_POINTS} points", logs=[log])
            cr.wait_for(lambda: offsets.done() == offsets.total, 30, "the group's offsets to reach the end",
                        logs=[log])
        finally:
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=60)[0]
            offsets.close()
            pg.sink.close()
            admin.execute(f"DROP TABLE IF EXISTS {table}")
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["dead_lettered"] == {}
    assert dlq_records(kafka.bootstrap, dlq) == 0
