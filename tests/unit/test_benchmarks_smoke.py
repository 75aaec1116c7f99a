"""The benchmarks still run: each one's ``--quick`` mode on tiny sizes. A benchmark is not a test,
so nothing here looks at a figure; it only proves the script completes and prints its tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def report(rows: Path, out: Path) -> str:
    """``run_all.py --report``: the Markdown report (and charts) from one benchmark's rows."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--report", str(rows),
                        "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return (out / "report.md").read_text()


def test_run_all_runs_a_benchmark_and_reports_it(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--only", "s3_client",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (tmp_path / "report.md").read_text()
    assert "### S3 client CPU per call" in md and "| GET | 8,528 |" in md
    assert {r["call"] for r in json.loads((tmp_path / "rows.json").read_text())} == {"PUT", "HEAD", "GET"}
    assert (tmp_path / "s3_client.log").stat().st_size > 0


def test_publisher_bytes_quick(minio, tmp_path):
    env = dict(os.environ, **minio.env)
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "publisher_bytes.py"), "--quick",
                        "--endpoint", minio.endpoint, "--json", str(tmp_path / "rows.json")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "| object" in out and "sidecar->S3" in out and "files+fsync" in out
    for kind in ("16x128 bfloat16", "32x256 float32"):
        assert f"| {kind}" in out, out
    assert "storage_dtype for a bfloat16 encoder" in out and "copies of each byte" in out
    md = report(tmp_path / "rows.json", tmp_path / "report")
    assert "### Worker sidecar: MB/s" in md and "| 16x128 bfloat16 | 2 |" in md


def test_consumer_throughput_quick(kafka, minio, postgres, tmp_path):
    """The store alone, the hand-written script and the consumer, every sink, both object sizes."""
    env = dict(os.environ, **minio.env, **postgres.env)
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "consumer_throughput.py"), "--quick",
                        "--bootstrap", kafka.bootstrap, "--endpoint", minio.endpoint,
                        "--pgvector", postgres.uri("").rstrip("/"), "--json", str(tmp_path / "rows.json")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "store pts/s" in p.stdout and "consumer ev/s" in p.stdout
    lines = p.stdout.splitlines()
    for sink in ("lancedb", "qdrant", "pgvector", "milvus"):
        for size in ("128KB", "4.7MB"):
            assert any(line.split()[:2] == [sink, size] for line in lines if line.strip()), (sink, size, p.stdout)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert sorted((r["sink"], r["size"]) for r in rows) == sorted(
        (k, z) for k in ("lancedb", "qdrant", "pgvector", "milvus") for z in ("128KB", "4.7MB")), rows
    md = report(tmp_path / "rows.json", tmp_path / "report")
    assert "### Consumer against a hand-written script" in md and "xychart-beta" in md
    assert (tmp_path / "report" / "consumer.png").stat().st_size > 10_000


def test_publisher_throughput_quick(tiny_llava, kafka, tmp_path):
    """The engine with the no-op connector and with the publisher (local store + Kafka), CPU and peak RSS
    by process."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "publisher_throughput.py"), "--quick",
                        "--model", str(tiny_llava), "--bootstrap", kafka.bootstrap,
                        "--json", str(tmp_path / "rows.json")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Throughput (median" in p.stdout and "Peak RSS, MB" in p.stdout
    rows = {r["config"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"noop", "local+kafka"} and rows["noop"]["vs_noop"] == 1.0
    assert "sidecar: scheduler" in rows["local+kafka"]["cpu_us_per_request"]
    md = report(tmp_path / "rows.json", tmp_path / "report")
    assert "### Engine throughput with the publisher" in md and (tmp_path / "report" / "engine.png").exists()


def test_latency_quick(tiny_llava, kafka, postgres, tmp_path):
    """Finish -> Kafka -> searchable under a steady load, both profiles, LanceDB and pgvector."""
    env = dict(os.environ, **postgres.env)
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latency.py"), "--quick", "--model", str(tiny_llava),
                        "--bootstrap", kafka.bootstrap, "--pgvector", postgres.uri("").rstrip("/"),
                        "--json", str(tmp_path / "rows.json")],
                       env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    searchable = {(r["profile"], r["sink"]) for r in rows if r["stage"] == "searchable" and r["n"] == r["requests"]}
    assert searchable == {(p, s) for p in ("default", "low-latency") for s in ("lancedb", "pgvector")}, rows
    md = report(tmp_path / "rows.json", tmp_path / "report")
    assert "### Latency from a request's finish" in md and (tmp_path / "report" / "latency.png").exists()


@pytest.mark.vllm  # engines on a model of its own (no fixture marks it)
def test_reuse_quick(tmp_path):
    """Engines on a store that holds every image: reuse off encodes them all, reuse on loads them all."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reuse.py"), "--quick", "--reuse-wait-ms", "5000",
                        "--json", str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert rows["off"]["saves"] == [9] and rows["off"]["loads"] == [0]  # 8 stored images + the warm-up
    assert rows["on"]["saves"] == [1] and rows["on"]["loads"] == [8] and rows["on"]["outputs_identical"]
    md = report(tmp_path / "rows.json", tmp_path / "report")
    assert "### Reusing stored embeddings" in md and (tmp_path / "report" / "reuse.png").exists()
