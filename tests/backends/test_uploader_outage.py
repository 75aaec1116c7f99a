"""The worker sidecar's uploader against a real MinIO that goes away: it retries each object with
backoff until ``retry_for_s`` after capture (the publisher passes ``durability_timeout_s``), so an
outage shorter than that loses nothing; a longer one, or a close, ends in counted failures within
the bound, never in a hang. Ring regions are released exactly once per item either way.

The MinIO server is the session's: running and serving again when each test ends.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import pytest

from publisher.sidecar.uploader import ObjectUploader, UploadJob
from publisher.stores import open_store
from schemas.objects import read_object

N = 5


@pytest.fixture
def store(minio, monkeypatch):
    for k, v in minio.env.items():
        monkeypatch.setenv(k, v)
    bucket = minio.create_bucket(f"outage-{uuid.uuid4().hex[:8]}")
    s, _ = open_store(f"s3://{bucket}/emb", endpoint_url=minio.endpoint)
    yield s, bucket
    s.close()
    if minio.backend == "native" and not minio.alive:
        minio.restart()


def jobs(n: int, released: list[str]) -> list[UploadJob]:
    import torch

    torch.manual_seed(0)
    lock = threading.Lock()

    def release(key: str):
        def done() -> None:
            with lock:
                released.append(key)
        return done

    return [UploadJob(f"m/float32/{i:064x}.safetensors", torch.randn(16, 32), release(f"k{i}"), f"{i:064x}",
                      "image", "ENCODER") for i in range(n)]


def native_only(minio) -> None:
    if minio.backend != "native":
        pytest.fail("kill/restart needs the native MinIO (VLLM_MM_EVENTS_SERVICES=native)")


def test_an_outage_shorter_than_the_deadline_loses_nothing(store, minio):
    native_only(minio)
    s, bucket = store
    up = ObjectUploader(s, "m", "float32", threads=2, retry_for_s=60)
    released: list[str] = []
    minio.kill()
    try:
        for job in jobs(N, released):
            up.submit(job)
        time.sleep(4)  # several failed attempts each
        assert up.stats.uploaded == 0 and up.stats.retries >= 3 and released == []  # bytes held meanwhile
    finally:
        minio.restart()
    assert up.drain(60) == 0
    up.close(5)
    st = up.stats.as_dict()
    print(st)
    assert st["uploaded"] == N and st["upload_failed"] == 0 and sorted(released) == [f"k{i}" for i in range(N)]
    client = minio.client()
    for job in jobs(N, []):  # the same seeded tensors again
        r = client.get_object(Bucket=bucket, Key=job.key)
        body = r["Body"].read()
        assert r["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
        assert (read_object(body).to_float32() == job.tensor.numpy()).all()


def test_past_the_deadline_each_item_fails_once_and_is_released(store, minio):
    native_only(minio)
    s, _ = store
    up = ObjectUploader(s, "m", "float32", threads=2, retry_for_s=2)
    released: list[str] = []
    minio.kill()
    try:
        t0 = time.monotonic()
        for job in jobs(N, released):
            up.submit(job)
        assert up.drain(30) == 0
        took = time.monotonic() - t0
    finally:
        minio.restart()
    st = up.stats.as_dict()
    print(st, f"{took:.1f}s")
    assert st["upload_failed"] == N and st["uploaded"] == 0 and len(released) == N
    assert 2 <= took < 2 + ObjectUploader.max_retry_s + 2  # the deadline, plus one backoff step at most


def test_close_during_an_outage_returns_within_its_budget(store, minio):
    native_only(minio)
    s, _ = store
    up = ObjectUploader(s, "m", "float32", threads=2, retry_for_s=600)
    released: list[str] = []
    minio.kill()
    try:
        for job in jobs(N, released):
            up.submit(job)
        time.sleep(1)
        t0 = time.monotonic()
        left = up.close(2)
        took = time.monotonic() - t0
        assert up.drain(10) == 0  # the retries give up at the close budget, not after retry_for_s
    finally:
        minio.restart()
    print(up.stats.as_dict(), f"close {took:.1f}s left={left}")
    assert took < 3 and up.stats.upload_failed == N and len(released) == N


def test_an_item_given_up_in_an_outage_is_stored_at_its_next_encoder_run(store, minio, monkeypatch):
    """The connector's worker half and its real worker sidecar: an item captured while MinIO is down longer
    than ``durability_timeout_s`` is given up. Once the store is back, the next encoder run of the same item
    stores it. Before, the worker took the key for stored at capture and skipped every later run: a popular
    image stayed unstored (every event listing it missing) for the engine's lifetime."""
    import torch
    from worker_half import encoder_step, worker_half

    native_only(minio)
    s, bucket = store
    monkeypatch.setenv("AWS_ENDPOINT_URL", minio.endpoint)
    worker = worker_half({"object_store": f"s3://{bucket}/emb", "s3_endpoint_url": minio.endpoint,
                          "durability_timeout_s": 1, "max_inflight_bytes": 1 << 20})
    mm_hash = "ab" * 32
    cache = {mm_hash: torch.randn(16, 32)}
    key = worker.key_for(mm_hash)

    def run_encoder() -> None:  # one step in which the encoder ran for the item
        encoder_step(worker, cache)

    try:
        minio.kill()
        try:
            run_encoder()
            deadline = time.monotonic() + 30  # past durability_timeout_s (1 s): the sidecar gives it up, and says so
            while key in worker._known:
                assert time.monotonic() < deadline, "the worker was not told the item was given up"
                worker._take_sidecar_messages()
                time.sleep(0.1)
        finally:
            minio.restart()
        assert s.head(key) is None
        run_encoder()  # the same image again, its encoder run again, the store back
        deadline = time.monotonic() + 30
        while s.head(key) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.head(key) is not None, "the item was not stored at its next encoder run"
        assert worker.saves == 2
    finally:
        report = worker.sidecar.close(10)
    assert report["upload_failed"] == 1 and report["uploaded"] == 1, report
