"""The connector's scheduler half as vLLM builds it, without an engine or a sidecar (what ``_init_scheduler``
sets up, the sidecar's channel a list): for tests that call its hooks in vLLM's order."""

from __future__ import annotations

from types import SimpleNamespace


def scheduler_half(sent: list, **config):
    """An ``MMEmbeddingPublisher`` in the scheduler role on ``config``; what it sends lands in ``sent``."""
    from publisher.config import PublisherConfig
    from publisher.vllm.connector import MMEmbeddingPublisher

    c = object.__new__(MMEmbeddingPublisher)
    c.config = PublisherConfig.load(config, environ={})
    c.sidecar = SimpleNamespace(send=lambda m: sent.append(m) or True, alive=True)
    c._finished, c._in_step, c._sent, c.dropped_events = [], False, 0, 0
    c._refuse, c._verdicts, c._step_items, c._reuse, c._reused = set(), {}, {}, None, {}
    return c
