"""The object store as a shared encoder cache: engines in separate processes sharing MinIO and Kafka,
with ``reuse_stored_embeddings``. The second engine, given images the first one stored, runs the
encoder zero times for them, answers with the same greedy tokens and publishes events naming the same
objects; a corrupted or foreign object is never used (the encoder runs, a counter rises)."""

from __future__ import annotations

import ast
import hashlib
import re
import uuid
from urllib.parse import urlsplit

import pytest

from schemas.objects import encode_array, read_object

from pipeline import consume, run_driver, stats_line

pytestmark = pytest.mark.e2e

FIRST = [[{"images": [1]}, {"images": [2, 3]}]]
SECOND = [[{"images": [1]}, {"images": [2, 3]}, {"images": [4]}]]  # 4 is new: the only encoder run


def reuse_report(log: str) -> dict:
    """The fetch sidecar's counts: logged by the connector at its shutdown, or by the sidecar itself when
    vLLM killed the engine first."""
    line = next(ln for ln in log.splitlines() if "mm-events reuse: " in ln or "mm-events reuse (" in ln)
    return ast.literal_eval(line[line.index("{"):])


def worker_counts(log: str) -> tuple[int, int]:
    m = re.search(r"saves=(\d+) loads=(\d+)", stats_line(log, "worker"))
    return int(m[1]), int(m[2])


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_llava, kafka, minio):
    """run(name, batches) -> one engine process on the shared bucket, its own topic; greedy, bf16."""
    bucket = minio.create_bucket(f"reuse-{uuid.uuid4().hex[:8]}")
    env = {k: v for k, v in minio.env.items() if k != "AWS_ENDPOINT_URL"}

    def run(name: str, batches: list) -> dict:
        topic = f"reuse.{name}.{uuid.uuid4().hex[:6]}"
        extra = {"object_store": f"s3://{bucket}/emb", "s3_endpoint_url": minio.endpoint,
                 "event_sink": f"kafka://{kafka.bootstrap}/{topic}", "reuse_stored_embeddings": True,
                 "reuse_wait_ms": 5000}  # exact counts: no item may miss its load on a busy 2-core machine
        results, log = run_driver({"model": str(tiny_llava), "extra_config": extra, "batches": batches,
                                   "temperature": 0.0, "dtype": "bfloat16"}, tmp_path_factory.mktemp(name), env=env)
        events = {e["request_id"]: e for e, _ in consume(kafka.bootstrap, topic, expected=len(results))}
        return dict(results=results, log=log, events=[events[r["request_id"]] for r in results])

    first = run("first", FIRST)
    return dict(run=run, first=first, s3=minio.client(), bucket=bucket)


def tokens(run: dict) -> dict:
    return {tuple(r["images"]): r["token_ids"] for r in run["results"]}


def items(run: dict) -> dict:
    return {seed: item for r, e in zip(run["results"], run["events"]) for seed, item in zip(r["images"],
                                                                                             e["embeddings"])}


def get(shared, uri: str) -> bytes:
    u = urlsplit(uri)
    return shared["s3"].get_object(Bucket=u.netloc, Key=u.path.lstrip("/"))["Body"].read()


def test_a_second_engine_loads_what_the_first_stored_instead_of_encoding(shared):
    first = shared["first"]
    assert worker_counts(first["log"]) == (3, 0)  # the first engine encodes its 3 images
    assert reuse_report(first["log"])["absent"] == 3
    for item in items(first).values():  # each object records the digest of the input it was computed from
        assert read_object(get(shared, item["uri"])).metadata["input_digest"].startswith("blake3:")

    second = shared["run"]("second", SECOND)
    saves, loads = worker_counts(second["log"])
    assert (saves, loads) == (1, 3), stats_line(second["log"], "worker")  # only image 4 ran the encoder
    report = reuse_report(second["log"])
    assert report["reused"] == 3 and report["fetched"] == 3 and report["rejected"] == 0
    # Same greedy answers as the engine that ran the encoder.
    assert {k: v for k, v in tokens(second).items() if k != (4,)} == tokens(first)
    # Its events are the same as if it had encoded them (same objects, ENCODER), and say they were reused.
    before, after = items(first), items(second)
    for seed in (1, 2, 3):
        a, b = before[seed], after[seed]
        assert {k: b[k] for k in ("uri", "sha256", "size_bytes", "shape", "mm_hash", "dtype")} == \
               {k: a[k] for k in ("uri", "sha256", "size_bytes", "shape", "mm_hash", "dtype")}
        assert b["source"] == "ENCODER" and b["reused"] and not a["reused"]
    assert not after[4]["reused"] and after[4]["source"] == "ENCODER"


def test_a_corrupted_or_foreign_object_is_never_used(shared):
    first = shared["first"]
    objs = items(first)
    # Image 2's object: one byte changed in place (its recorded checksum kept). Image 3's: replaced by a
    # well-formed object of the right shape, with a correct checksum, from another model.
    u2, u3 = (urlsplit(objs[s]["uri"]) for s in (2, 3))
    body = bytearray(get(shared, objs[2]["uri"]))
    body[-1] ^= 0xFF
    head = shared["s3"].head_object(Bucket=u2.netloc, Key=u2.path.lstrip("/"))
    shared["s3"].put_object(Bucket=u2.netloc, Key=u2.path.lstrip("/"), Body=bytes(body), Metadata=head["Metadata"])
    stored3 = read_object(get(shared, objs[3]["uri"]))
    foreign = encode_array(stored3.to_float32(), storage_dtype="bfloat16", mm_hash=objs[3]["mm_hash"],
                           modality="image", model="someone/else", source="ENCODER")
    meta = dict(foreign.object_metadata())
    shared["s3"].put_object(Bucket=u3.netloc, Key=u3.path.lstrip("/"), Body=foreign.data, Metadata=meta)
    assert hashlib.sha256(foreign.data).hexdigest() == meta["sha256"]

    third = shared["run"]("third", [[{"images": [2, 3]}, {"images": [1]}]])
    assert worker_counts(third["log"]) == (2, 1), stats_line(third["log"], "worker")  # 2 and 3 encoded again
    report = reuse_report(third["log"])
    assert report["rejected"] == 2 and report["reused"] == 1 and report["fetched"] == 1
    assert "not reusing" in third["log"] and "SHA-256" in third["log"] and "someone/else" in third["log"]
    assert tokens(third) == tokens(first)  # the encoder's own outputs, not the tampered ones
    reused = {seed: item["reused"] for seed, item in items(third).items()}
    assert reused == {1: True, 2: False, 3: False}
