"""The first ten minutes: the console script on the embedded defaults, with no flags.

A fresh data directory (``$XDG_DATA_HOME``, honoured by the publisher and the consumer alike)
gets objects and an event log written by the publisher's own store and log writer
(``synth``: no engine; the engine path is covered by the other end-to-end tests). Then
``vllm-mm-events`` runs as a user runs it: ``consume --once``, ``search --like``, ``events``.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from consumers.config import default_group
from consumers.sinks import open_vector_sink
from consumers.vectors import point_id
from publisher.config import PublisherConfig
from publisher.event_sinks.avro_file import AvroFileSink
from publisher.stores.local import LocalDirStore
from schemas.codec import AvroCodec

import consumer_run as cr
import synth

pytestmark = pytest.mark.e2e

HOUR_MS = 3600 * 1000
# (request id, metadata, hours ago, items): tenants and ages differ, for --where and --since.
PLAN = [
    ("req-old-acme", {"tenant": "acme", "tier": "gold"}, 3, 1),
    ("req-old-globex", {"tenant": "globex"}, 3, 2),
    ("req-acme-1", {"tenant": "acme", "tier": "silver"}, 0, 2),
    ("req-globex-1", {"tenant": "globex", "tier": "gold"}, 0, 1),
    ("req-acme-2", {"tenant": "acme", "tier": "gold"}, 0, 1),
    ("req-none", {}, 0, 1),
]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without any consumer/publisher setting, HOME and XDG_DATA_HOME here."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_MM_EVENTS_") and k not in ("AWS_ENDPOINT_URL", "XDG_DATA_HOME")}
    # The metrics server stays on (9400 by default) except where a test on a shared host could collide.
    return {**env, "HOME": str(home / "home"), "XDG_DATA_HOME": str(home / "xdg"), **extra}


def cli(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([cr.CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"vllm-mm-events {' '.join(args)} still running after {timeout}s: {e.stderr}") from None


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}:\n{p.stderr[-6000:]}"
    return p


def summary(p: subprocess.CompletedProcess) -> dict:
    return json.loads(ok(p).stdout.strip().splitlines()[-1])


class Embedded:
    """The publisher's embedded defaults in a fresh data directory: objects + the Avro event log."""

    def __init__(self, tmp_path: Path, monkeypatch):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        for k in [k for k in os.environ if k.startswith("VLLM_MM_EVENTS_")]:
            monkeypatch.delenv(k)
        cfg = PublisherConfig.load(environ={})  # where the publisher writes by default
        self.data = tmp_path / "xdg" / "vllm-mm-events"
        assert cfg.object_store == (self.data / "objects").as_uri()
        assert cfg.event_sink == (self.data / "events.avro").as_uri()
        self.log = self.data / "events.avro"
        self.store = LocalDirStore(self.data / "objects")
        self.writer = AvroFileSink(self.log, AvroCodec())
        self.events: list[dict] = []
        self.uris: dict[str, list[str]] = {}
        self.env = clean_env(tmp_path, VLLM_MM_EVENTS_METRICS_PORT="0")
        self.env_bare = clean_env(tmp_path)

    def write(self, plan=PLAN, seed: int = 0) -> list[dict]:
        """One block of events, as one publisher flush."""
        out = []
        for i, (rid, metadata, hours_ago, items) in enumerate(plan):
            ev, uris = synth.make_event(self.store, "", rid, [synth.features(seed + 100 * i + j) for j in range(items)],
                                        metadata)
            shift = hours_ago * HOUR_MS
            ev["event_time"] -= shift
            ev["timings"]["finished_time_ms"] -= shift
            ev["timings"]["arrival_time_ms"] -= shift
            self.writer.publish(ev, lambda err: None)
            self.events.append(ev)
            self.uris[rid] = uris
            out.append(ev)
        assert self.writer.flush(5) == 0
        return out

    def ids(self, events=None) -> set[str]:
        return {point_id(e["event_id"], it["item_index"]) for e in (events or self.events) for it in e["embeddings"]}


@pytest.fixture
def embedded(tmp_path, monkeypatch) -> Embedded:
    return Embedded(tmp_path, monkeypatch)


def stored(uri: str, ids: set[str]) -> tuple[set[str], int]:
    """(which of ``ids`` the sink holds, how many points it holds)."""
    s = open_vector_sink(uri)
    try:
        assert s.describe() is not None, f"{uri} was not created"
        return set(s.retrieve(sorted(ids))), s.count()
    finally:
        s.close()


def checkpoint(embedded: Embedded, group: str) -> dict:
    return json.loads((embedded.log.parent / f"events.avro.{group}.checkpoint").read_text())


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def expected_json(ev: dict) -> dict:
    """What ``events --format json`` prints for an event the publisher wrote: the record, times in ISO-8601."""
    out = json.loads(json.dumps(ev))
    out["event_time"] = iso(ev["event_time"])
    out["timings"] = {**ev["timings"], "finished_time_ms": iso(ev["timings"]["finished_time_ms"]),
                      "arrival_time_ms": iso(ev["timings"]["arrival_time_ms"])}
    return out


def json_lines(p: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in ok(p).stdout.splitlines() if line.strip()]


# ---- consume and search, no flags ------------------------------------------------------------

def test_consume_once_and_search_need_no_flags_and_a_new_sink_starts_from_zero(embedded, tmp_path):
    embedded.write()
    default_sink = f"lancedb://{embedded.data}/lancedb/mm_embeddings"
    group = default_group([default_sink])

    t0 = time.monotonic()
    p = cli(embedded.env, "consume", "--once")
    took = time.monotonic() - t0
    n_points = sum(len(e["embeddings"]) for e in embedded.events)
    assert summary(p) == {"consumed": 6, "indexed": n_points, "committed": 6, "dead_lettered": {}}, p.stderr
    assert f"consumer group {group} (derived from the sinks" in p.stderr
    assert stored(default_sink, embedded.ids()) == (embedded.ids(), n_points)
    first = checkpoint(embedded, group)
    assert first["offset"] == embedded.log.stat().st_size and first["index"] == 0
    print(f"consume --once (6 events, {n_points} points): {took:.1f}s")

    # search --like <uri>: the request that holds the object comes first, with score 1.0
    like = embedded.uris["req-acme-1"][1]
    hits = ok(cli(embedded.env, "search", "--like", like)).stdout.splitlines()
    assert hits[0].split()[:3] == ["rank", "score", "request_id"]
    rank, score, request_id, *_ = hits[1].split()
    assert (rank, request_id) == ("1", "req-acme-1") and float(score) == pytest.approx(1.0, abs=1e-4)
    assert hits[1].split()[-1] == like and len(hits) == 1 + 5

    # A second sink, no --group: a group of its own, whose checkpoint starts at zero; it gets everything.
    other = f"lancedb://{tmp_path}/other/mm_embeddings"
    other_group = default_group([other])
    assert other_group != group
    assert not (embedded.log.parent / f"events.avro.{other_group}.checkpoint").exists()
    assert summary(cli(embedded.env, "consume", "--once", "--sink", other)) == \
        {"consumed": 6, "indexed": n_points, "committed": 6, "dead_lettered": {}}
    assert stored(other, embedded.ids()) == (embedded.ids(), n_points)
    assert checkpoint(embedded, other_group)["offset"] == first["offset"]
    assert checkpoint(embedded, group) == first  # the first sink's position is its own

    # Both sinks in one pass are yet another set: a third group, from zero, no duplicates in either.
    both = ["--sink", default_sink, "--sink", other]
    assert summary(cli(embedded.env, "consume", "--once", *both))["consumed"] == 6
    assert stored(default_sink, embedded.ids())[1] == stored(other, embedded.ids())[1] == n_points

    # Re-running resumes; a named --group wins (and starts from zero itself).
    new = embedded.write([("req-late", {"tenant": "acme"}, 0, 1)], seed=7)
    assert summary(cli(embedded.env, "consume", "--once"))["consumed"] == 1
    assert summary(cli(embedded.env, "consume", "--once"))["consumed"] == 0
    assert stored(default_sink, embedded.ids())[0] == embedded.ids()
    assert summary(cli(embedded.env, "consume", "--once", "--group", "mine"))["consumed"] == 7
    assert (embedded.log.parent / "events.avro.mine.checkpoint").exists()
    assert new[0]["request_id"] == "req-late"


def test_consume_once_bare_binds_the_default_metrics_port_or_says_what_to_do(embedded):
    """Truly nothing set. If 9400 is taken (another consumer here), the error says how to go on."""
    embedded.write(PLAN[:2])
    p = cli(embedded.env_bare, "consume", "--once")
    if p.returncode == 0:
        assert summary(p)["consumed"] == 2
    else:
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().endswith("pass --metrics-port 0 to turn metrics off, or another port"), p.stderr
    with socket.socket() as taken:  # and the error, for certain: a port that is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = cli(embedded.env_bare, "consume", "--once", "--metrics-host", "127.0.0.1", "--metrics-port", str(port))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f"vllm-mm-events consume: metrics port {port} on 127.0.0.1 is in use "
                                                 "(another consumer?): pass --metrics-port 0 to turn metrics off, "
                                                 "or another port")


def test_errors_say_what_to_do_next(embedded):
    log = embedded.log
    for args in (["consume", "--once"], ["events"]):
        p = cli(embedded.env, *args)
        assert p.returncode == 1
        assert p.stderr.strip().splitlines()[-1] == (f"vllm-mm-events {args[0]}: no event log at {log}: run the "
                                                     "publisher (scripts/demo) first, or pass --source")
    embedded.write(PLAN[:1])
    p = cli(embedded.env, "search", "--like", embedded.uris["req-old-acme"][0])
    assert p.returncode == 1 and "does not exist yet" in p.stderr
    assert p.stderr.strip().endswith("run `vllm-mm-events consume --once` with the same --sink first, or pass the "
                                     "--sink you indexed into")
    ok(cli(embedded.env, "consume", "--once"))
    p = cli(embedded.env, "search", "--like", str(embedded.data / "objects" / "nope.safetensors"))
    assert p.returncode == 1 and "no such object" in p.stderr and "pass --like the URI of a stored object" in p.stderr
    p = cli(embedded.env, "consume", "--once", "--sink", "faiss:///x/y")
    assert p.returncode == 2 and "see `vllm-mm-events consume --help`" in p.stderr
    for bad, needle in ((["--since", "yesterday"], "--since: expected an ISO-8601 time"),
                        (["--where", "tenant"], "--where: expected key=value"), (["--limit", "0"], "--limit")):
        p = cli(embedded.env, "events", *bad)
        assert p.returncode == 2 and needle in p.stderr and "see `vllm-mm-events events --help`" in p.stderr


def test_every_command_shows_examples_in_its_help(embedded):
    for cmd in ([], ["consume"], ["search"], ["events"]):
        out = ok(cli(embedded.env, *cmd, "--help")).stdout
        assert "examples" in out and "  vllm-mm-events " in out, cmd
    top = ok(cli(embedded.env, "--help")).stdout
    assert f"file://{embedded.log}" in top and f"lancedb://{embedded.data}/lancedb/mm_embeddings" in top
    consume = ok(cli(embedded.env, "consume", "--help")).stdout
    assert "vllm-mm-events-<scheme>-<table>" in consume and "<log>.<group>.checkpoint" in consume


# ---- progress --------------------------------------------------------------------------------

def test_progress_is_a_log_line_off_a_terminal_and_a_bar_on_one(embedded):
    for i in range(4):
        embedded.write([(f"bulk-{i}-{k}", {"tenant": "acme"}, 0, 1) for k in range(50)], seed=1000 * i)
    n = len(embedded.events)
    # Not a terminal: log lines, with the total known under --once.
    p = cli({**embedded.env, "VLLM_MM_EVENTS_PROGRESS_INTERVAL_S": "0.1"}, "consume", "--once",
            "--batch-max-records", "10", "--sink", f"lancedb://{embedded.data}/lancedb/logged")
    assert summary(p)["consumed"] == n
    lines = [x for x in p.stderr.splitlines() if "progress: consumed=" in x]
    assert lines, p.stderr
    assert any(f"/{n} (" in x and "/s)" in x and "lag=" in x for x in lines), lines
    assert "\r" not in p.stderr and "consume [" not in p.stderr

    # A terminal (a real pseudo-terminal as stderr): one line redrawn in place, ending full.
    master, slave = pty.openpty()
    proc = subprocess.Popen([cr.CLI, "consume", "--once", "--batch-max-records", "10", "--sink",
                             f"lancedb://{embedded.data}/lancedb/barred"], env={**embedded.env, "TERM": "xterm"},
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:
                return
            if not b:
                return
            chunks.append(b)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    out, _ = proc.communicate(timeout=180)
    t.join(10)
    os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, tty[-4000:]
    assert json.loads(out.strip().splitlines()[-1])["consumed"] == n
    assert "\rconsume [" in tty and f"100%  {n}/{n} events" in tty, tty[-2000:]
    assert "progress: consumed=" not in tty  # the bar replaces the log line
    assert all(not x.startswith("consume [") or x.endswith("\x1b[K") for x in tty.split("\r"))
    for seg in tty.split("\r"):  # a log line first wipes the bar: it never follows the bar's text
        if " INFO " in seg:
            assert "consume [" not in seg.split(" INFO ", 1)[0], seg


# ---- events ----------------------------------------------------------------------------------

def test_events_prints_filters_and_writes_nothing(embedded):
    embedded.write()
    by_id = {e["request_id"]: e for e in embedded.events}

    got = json_lines(cli(embedded.env, "events", "--format", "json", "--request-id", "req-acme-1"))
    assert got == [expected_json(by_id["req-acme-1"])]

    everything = json_lines(cli(embedded.env, "events", "--format", "json"))
    assert everything == [expected_json(e) for e in embedded.events]

    def ids(*args):
        return [e["request_id"] for e in json_lines(cli(embedded.env, "events", "--format", "json", *args))]

    assert ids("--where", "tenant=acme") == ["req-old-acme", "req-acme-1", "req-acme-2"]
    assert ids("--where", "tenant=acme", "--where", "tier=gold") == ["req-old-acme", "req-acme-2"]
    assert ids("--where", "tier=gold", "--since", "1h") == ["req-globex-1", "req-acme-2"]
    assert ids("--where", "tenant=initech") == []
    assert ids("--since", "1h") == ["req-acme-1", "req-globex-1", "req-acme-2", "req-none"]
    assert ids("--since", "4h") == [r for r, *_ in PLAN]
    cut = datetime.now(timezone.utc) - timedelta(hours=2)
    assert ids("--since", cut.isoformat()) == ids("--since", cut.strftime("%Y-%m-%dT%H:%M:%SZ")) == ids("--since", "1h")
    assert ids("--since", "4h", "--limit", "2") == ["req-old-acme", "req-old-globex"]

    table = ok(cli(embedded.env, "events")).stdout.splitlines()
    assert table[0].split()[:3] == ["TIME", "(UTC)", "REQUEST_ID"] and len(table) == 1 + len(PLAN)
    row = table[2].split()
    ev = by_id["req-old-globex"]
    assert row == [iso(ev["event_time"]), "req-old-globex", synth.MODEL, "image:2", "0", ev["event_id"]]

    # Read-only: no checkpoint, no dead letters, the log untouched.
    assert sorted(p.name for p in embedded.log.parent.iterdir()) == ["events.avro", "objects"]


def test_events_follow_prints_new_events_and_ctrl_c_exits_0(embedded):
    embedded.write(PLAN[:2])
    proc = subprocess.Popen([cr.CLI, "events", "--follow", "--format", "json", "--where", "tenant=acme"],
                            env=embedded.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["request_id"] == "req-old-acme"
        embedded.write(PLAN[2:], seed=50)
        assert json.loads(proc.stdout.readline())["request_id"] == "req-acme-1"
        assert json.loads(proc.stdout.readline())["request_id"] == "req-acme-2"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert sorted(p.name for p in embedded.log.parent.iterdir()) == ["events.avro", "objects"]


def test_an_unreadable_block_is_warned_about_and_skipped(embedded):
    embedded.write(PLAN[:2])
    good = embedded.log.stat().st_size
    embedded.write(PLAN[2:4], seed=10)  # corrupted below
    embedded.write(PLAN[4:], seed=20)
    data = bytearray(embedded.log.read_bytes())
    data[good + 4:good + 28] = b"\xff" * 24
    embedded.log.write_bytes(bytes(data))
    p = ok(cli(embedded.env, "events", "--format", "json"))
    assert [json.loads(x)["request_id"] for x in p.stdout.splitlines()] == \
        ["req-old-acme", "req-old-globex", "req-acme-2", "req-none"]
    warnings = [x for x in p.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1, p.stderr
    assert warnings[0].startswith(f"vllm-mm-events events: warning: skipped an unreadable record at "
                                  f"file={embedded.log} block_offset={good} index=0: ")


# ---- events from Kafka -----------------------------------------------------------------------

def test_events_from_a_kafka_topic_match_the_log_and_commit_nothing(embedded, kafka):
    from confluent_kafka.admin import AdminClient

    embedded.write()
    codec = AvroCodec()
    topic = f"cli-events-{os.getpid()}-{time.monotonic_ns()}"
    cr.create_topic(kafka.bootstrap, topic, 1)
    records = [(e["request_id"].encode(), codec.encode(e), 0) for e in embedded.events]
    records.insert(3, (b"junk", b"\x00\x01not an event", 0))  # offset 3: undecodable (schema id 65536, no registry)
    records.insert(5, (b"junk", b"plain text", 0))  # offset 5: neither framing
    cr.produce(kafka.bootstrap, topic, records)
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    groups_before = {g.group_id for g in admin.list_consumer_groups().result(30).valid}

    source = ["--source", f"kafka://{kafka.bootstrap}/{topic}"]
    from_file = ok(cli(embedded.env, "events", "--format", "json")).stdout
    p = ok(cli(embedded.env, "events", "--format", "json", *source))
    assert p.stdout == from_file
    warnings = [x for x in p.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 2, p.stderr
    assert warnings[0].startswith(f"vllm-mm-events events: warning: skipped an undecodable record at topic={topic} "
                                  "partition=0 offset=3 ")
    assert "unknown_schema" in warnings[0]
    assert "partition=0 offset=5 " in warnings[1] and "undecodable" in warnings[1]

    assert json_lines(cli(embedded.env, "events", "--format", "json", "--where", "tenant=acme", *source)) == \
        json_lines(cli(embedded.env, "events", "--format", "json", "--where", "tenant=acme"))
    table = ok(cli(embedded.env, "events", *source, "--request-id", "req-none")).stdout.splitlines()
    assert len(table) == 2 and table[1].split()[1] == "req-none"

    # --follow on Kafka: new records show up; Ctrl-C exits 0.
    proc = subprocess.Popen([cr.CLI, "events", "--follow", "--format", "json", "--request-id", "req-late", *source],
                            env=embedded.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        late = embedded.write([("req-late", {"tenant": "acme"}, 0, 1)], seed=99)[0]
        cr.produce(kafka.bootstrap, topic, [(b"req-late", codec.encode(late), 0)])
        assert json.loads(proc.stdout.readline()) == expected_json(late)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

    groups_after = {g.group_id for g in admin.list_consumer_groups().result(30).valid}
    assert groups_after == groups_before  # read-only: no group joined, no offsets committed

    p = cli(embedded.env, "events", "--source", f"kafka://{kafka.bootstrap}/no-such-topic-{os.getpid()}")
    assert p.returncode == 1 and "no topic" in p.stderr
    assert p.stderr.strip().endswith("check the topic in --source, or run the publisher first (it creates the topic "
                                     "with its first event)")
