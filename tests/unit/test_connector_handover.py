"""How the connector hands finished requests and captured items to its sidecars: one message per
engine step, and at once outside a step (an abort between steps; a CUDA copy landing during the
forward pass). The hooks are called here in the order vLLM calls them; the engine end of it runs in
every e2e test (each returned request has exactly its event)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from scheduler_half import scheduler_half

from publisher.sidecar.events import FinishedRequest
from publisher.sidecar.messages import ItemsCaptured, RequestsFinished
from publisher.sidecar.ring import SharedRing
from publisher.vllm.capture import DeviceToHostCapture
from publisher.vllm.connector import MMEmbeddingPublisher


def finished(i: int) -> FinishedRequest:
    return FinishedRequest(f"req-{i}", f"req-{i}-00000000", "m", "stop", None, 3, 2, {}, (), None, None,
                           1700000000.0 + i)


def test_requests_finished_in_a_step_go_in_one_message_at_its_end():
    sent: list = []
    c = scheduler_half(sent)
    c.build_connector_meta(None)  # schedule(): the step starts
    c._hand_over(finished(1), {"h1": "k1"})
    c._hand_over(finished(2), {})
    assert sent == [] and c._sent == 0
    assert c.take_unavailable_requests() == set()  # update_from_output ends
    assert [type(m) for m in sent] == [RequestsFinished]
    assert [(r.request_id, keys, check) for r, keys, check in sent[0].requests] == [("req-1", {"h1": "k1"}, None),
                                                                                   ("req-2", {}, None)]
    assert c._sent == 2
    c._hand_over(finished(3), {})  # between steps (an abort from the input queue): at once
    assert [r.request_id for m in sent[1:] for r, _, _ in m.requests] == ["req-3"] and c._sent == 3
    assert c.take_unavailable_requests() == set() and len(sent) == 2  # nothing left to send


def test_the_drop_policy_counts_requests_waiting_for_the_steps_end():
    sent: list = []
    c = scheduler_half(sent, backpressure="drop", max_pending_events=2)
    c._settled = bytearray(16)  # the sidecar's shared counters: nothing settled yet
    c.build_connector_meta(None)
    for i in range(3):
        c._hand_over(finished(i), {})
    c.take_unavailable_requests()
    assert c._sent == 2 and c.dropped_events == 1
    assert [r.request_id for m in sent if isinstance(m, RequestsFinished) for r, _, _ in m.requests] == ["req-0",
                                                                                                      "req-1"]


def test_items_captured_in_a_step_go_in_one_message_at_its_end():
    sent: list = []
    c = object.__new__(MMEmbeddingPublisher)
    c._uploads_here, c._in_step, c._ready = True, False, []
    c.saves = c.loads = c.dropped = 0
    c._told = (0, 0, 0)
    import threading

    c._ready_lock = threading.Lock()
    c.sidecar = SimpleNamespace(send=lambda m: sent.append(m) or True)
    ring = SharedRing(1 << 20)
    cap = DeviceToHostCapture(ring, c._items_ready)
    t = torch.randn(4, 8)
    c.start_save_caches({})
    for i in range(3):
        cap.capture(t, ring.allocator.alloc(t.numel() * 4), f"item-{i}")
    assert sent == []
    assert c.get_finished(set()) == (None, None)
    assert [type(m) for m in sent] == [ItemsCaptured] and sent[0].items == ("item-0", "item-1", "item-2")
    cap.capture(t, ring.allocator.alloc(t.numel() * 4), "item-3")  # lands outside a step: at once
    assert sent[1].items == ("item-3",)
    # The worker's totals ride along; a step that changed them says so even with no items (the sidecar
    # reports them itself if vLLM kills the worker), and a step that changed nothing sends nothing.
    c.start_save_caches({})
    c.loads += 2  # start_load_caches: two items loaded from the store instead of encoded
    c.get_finished(set())
    assert sent[2] == ItemsCaptured((), (0, 2, 0))
    c.start_save_caches({})
    c.get_finished(set())
    assert len(sent) == 3


def test_durable_before_return_holds_a_request_failed_after_the_steps_end():
    """vLLM finishes the requests that failed in a step after take_unavailable_requests, and sends their
    outputs in the same update: with durable_before_return, the hand-over holds until the sidecar has
    spooled them. An abort between steps is not held (its client is gone)."""
    import struct
    import threading
    import time
    from dataclasses import replace

    sent: list = []
    c = scheduler_half(sent, durable_before_return=True)
    c._settled = bytearray(16)  # the sidecar's shared counters: settled, spooled

    def spool_later():  # the sidecar fsyncs what it was sent, 0.3 s later
        time.sleep(0.3)
        struct.pack_into("<Q", c._settled, 8, c._sent)

    c.build_connector_meta(None)
    c.take_unavailable_requests()  # the step's end; then vLLM fails a request in the same update
    threading.Thread(target=spool_later).start()
    t0 = time.monotonic()
    c._hand_over(replace(finished(1), finish_reason="error"), {})
    assert time.monotonic() - t0 >= 0.3 and struct.unpack_from("<Q", c._settled, 8)[0] == c._sent == 1
    t0 = time.monotonic()
    c._hand_over(replace(finished(2), finish_reason="abort"), {})  # nobody waits for its response
    assert time.monotonic() - t0 < 0.2 and c._sent == 2
