"""The connector's worker half as vLLM builds it (minus vLLM's config), with its real sidecar: for tests that
call its hooks in vLLM's order without an engine."""

from __future__ import annotations


def worker_half(config: dict, model: str = "m"):
    """An ``MMEmbeddingPublisher`` in the worker role on ``config`` (resolved for a float32 model)."""
    import torch

    from publisher.config import PublisherConfig
    from publisher.vllm.connector import MMEmbeddingPublisher
    from schemas.uris import StoreLocation

    worker = object.__new__(MMEmbeddingPublisher)
    worker.config = PublisherConfig.load(config, environ={}).resolved(torch.float32)
    worker.model, worker._keys, worker._connector_metadata = model, {}, None
    worker.location = StoreLocation.parse(worker.config.object_store)
    worker._init_worker()
    return worker


def encoder_step(worker, cache: dict) -> None:
    """One engine step in which the encoder ran for every item of ``cache`` (mm_hash -> its output)."""
    worker.start_save_caches(cache)
    for mm_hash in cache:
        worker.save_caches(cache, mm_hash)
    worker.get_finished(set())
