"""Run ``vllm-mm-events consume`` as a user would: the installed console script, in its own process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLI = str(Path(sys.executable).parent / "vllm-mm-events")


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([CLI, *args], env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:  # say what it was doing
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"vllm-mm-events {args[0]} still running after {timeout}s:\n{err[-6000:]}") from None


def consume_once(args: list[str], env: dict | None = None, timeout: float = 300) -> tuple[dict, str]:
    """``consume --once``; returns (the summary it prints, its log). Fails on a non-zero exit."""
    p = run_cli(["consume", "--once", "--metrics-port", "0", *args], env, timeout)
    if p.returncode != 0:
        raise AssertionError(f"consume exited {p.returncode}:\n{p.stderr[-6000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def start(args: list[str], env: dict | None, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen([CLI, "consume", *args], env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=log_path.open("w"), text=True)


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            rest = line[len(name):]
            if rest[:1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(pred, timeout: float, what: str, interval: float = 0.5, logs: list[Path] = ()):
    """Poll ``pred`` until it is truthy; a timeout names ``what`` and ends with the tails of ``logs``
    (the consumers' own account of what they were doing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    tails = "".join(f"\n--- {p} (tail) ---\n{p.read_text(errors='replace')[-4000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tails}")


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes, int | None]]) -> None:
    """(key, value, partition) in order, idempotent, acks=all."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for key, value, partition in records:
        kw = {} if partition is None else {"partition": partition}
        p.produce(topic, value=value, key=key, **kw)
    assert p.flush(30) == 0


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the future
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)


def last_assignment(log: str) -> set[int]:
    """The partitions a consumer holds, from its JSON log lines (``--log-format json``), up to its stop request.
    A line still being written is skipped."""
    owned: set[int] = set()
    for line in log.splitlines():
        try:
            msg = json.loads(line)["msg"]
        except ValueError:
            continue
        if msg.startswith("stop requested"):
            break
        m = re.match(r"assigned partitions \[[\d, ]*\] \(now \[([\d, ]*)\]\)", msg)
        if m:
            owned = {int(x) for x in m.group(1).split(",") if x.strip()}
        m = re.match(r"revoked partitions \[([\d, ]*)\]", msg)
        if m:
            owned -= {int(x) for x in m.group(1).split(",") if x.strip()}
    return owned
