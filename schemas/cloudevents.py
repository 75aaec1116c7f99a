"""CloudEvents' Kafka protocol binding, binary mode: an event's attributes as ``ce_*`` record headers."""

from __future__ import annotations

import time
from typing import Any, Mapping

CE_TYPE = "io.vllm.mm_embeddings.request_finished.v1"


def cloudevent_headers(event: Mapping[str, Any], content_type: str) -> list[tuple[str, bytes]]:
    """``ce_id`` is the event id; ``ce_subject`` and ``ce_partitionkey`` the request id."""
    t = time.gmtime(event["event_time"] / 1000)
    ce_time = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{event['event_time'] % 1000:03d}Z"
    h = [
        ("content-type", content_type),
        ("ce_specversion", "1.0"),
        ("ce_id", event["event_id"]),
        ("ce_source", f"/vllm-mm-events/{event['producer']['hostname']}"),
        ("ce_type", CE_TYPE),
        ("ce_time", ce_time),
        ("ce_subject", event["request_id"]),
        ("ce_partitionkey", event["request_id"]),
    ]
    return [(k, v.encode()) for k, v in h]
