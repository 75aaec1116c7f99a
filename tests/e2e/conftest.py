"""Fixtures the consumer end-to-end tests share: the real engine's events, run once per session."""

from __future__ import annotations

import pytest

from pipeline import publish_consumer_events


@pytest.fixture(scope="session")
def published(tmp_path_factory, tiny_llava, kafka, minio):
    """The engine on the tiny model -> MinIO objects + a 3-partition Kafka topic (tests/support/pipeline.py)."""
    return publish_consumer_events(tmp_path_factory.mktemp("consumers"), tiny_llava, kafka, minio)


@pytest.fixture
def consumer_env(published, minio, postgres, monkeypatch):
    """What a consumer pod gets: S3 credentials and endpoint, the bucket it may read, the sink password,
    nothing in URIs. The test process gets them too, to read stores and sinks directly."""
    env = {**minio.env, "VLLM_MM_EVENTS_S3_ENDPOINT_URL": minio.endpoint, **postgres.env,
           "VLLM_MM_EVENTS_OBJECT_STORE": f"s3://{published['bucket']}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
