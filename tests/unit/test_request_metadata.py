"""A request's metadata on the scheduler loop: whatever vLLM accepts becomes the event's text or a refusal
with its reason, never an exception there (one stops EngineCore, and every request with it); vLLM's own
transfer parameters are not the caller's metadata."""

from __future__ import annotations

from types import SimpleNamespace

from scheduler_half import scheduler_half
from vllm import SamplingParams
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from publisher.vllm.connector import request_metadata


def request(rid: str, sp: SamplingParams):
    """What the hooks read of a text-only request (no media: the metadata verdict alone decides)."""
    return SimpleNamespace(request_id=rid, sampling_params=sp, mm_features=[])


def through_engine_core(sp: SamplingParams) -> SamplingParams:
    """As the engine process receives it from the API server."""
    return MsgpackDecoder(SamplingParams).decode(MsgpackEncoder().encode(sp))


def test_vllms_transfer_params_are_neither_published_nor_counted():
    """vLLM copies kv_transfer_params / ec_transfer_params into extra_args. On a decode instance the block
    ids grow with the prompt: a long prompt was refused (over max_metadata_bytes), and peers' hosts and
    ports went to Kafka as the caller's metadata."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "vllm_xargs": {"tenant": "acme"},
            "kv_transfer_params": {"remote_host": "10.0.3.17", "remote_port": 5600,
                                   "remote_block_ids": [list(range(3000))]},
            "ec_transfer_params": {"anything": "x"}}
    sp = through_engine_core(ChatCompletionRequest(**body).to_sampling_params(16, {}))
    assert set(sp.extra_args) == {"tenant", "kv_transfer_params", "ec_transfer_params"}  # vLLM's doing
    assert request_metadata(request("r", sp)) == ({"tenant": "acme"}, len("tenant") + len("acme"))
    c = scheduler_half([])
    assert c.ensure_cache_available(request("r", sp), 0) is True
    assert c.take_unavailable_requests() == set()


def test_metadata_json_cannot_sort_or_utf8_cannot_hold_becomes_text():
    """A map mixing int and str keys (vLLM's msgpack carries it) made json.dumps(sort_keys=True) raise a
    TypeError on the scheduler loop: EngineCore stopped. A lone surrogate (an in-process caller's) would
    have failed its UTF-8 size count the same way."""
    mixed = through_engine_core(SamplingParams(max_tokens=4, extra_args={"labels": {1: "cat", "source": "cam"}}))
    assert mixed.extra_args["labels"] == {1: "cat", "source": "cam"}
    lone = SamplingParams(max_tokens=4, extra_args={"k\udc80": "v\udc80", "n": 3})
    c = scheduler_half([])
    assert c.ensure_cache_available(request("mixed", mixed), 0) is True
    assert c.ensure_cache_available(request("lone", lone), 0) is True
    assert c.take_unavailable_requests() == set()
    assert c._verdicts["mixed"][1] == {"labels": '{"1": "cat", "source": "cam"}'}
    assert c._verdicts["lone"][1] == {"k\\udc80": "v\\udc80", "n": "3"}
    for metadata in (c._verdicts["mixed"][1], c._verdicts["lone"][1]):
        assert all(k.encode() and v.encode() for k, v in metadata.items())  # all of it is UTF-8


def test_metadata_nested_past_json_is_refused_with_its_reason():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    c = scheduler_half([])
    sp = SamplingParams(max_tokens=4, extra_args={"deep": deep})
    assert c.ensure_cache_available(request("deep", sp), 0) is False
    assert c.take_unavailable_requests() == {"deep"}
    refused, params = c.request_finished(SimpleNamespace(request_id="deep", sampling_params=sp, mm_features=[]))
    assert params == {"mm_embeddings": [], "error": "its metadata (vllm_xargs / extra_args) cannot be published: "
                      "RecursionError: maximum recursion depth exceeded while encoding a JSON object"}


def test_a_request_id_past_its_cap_is_refused_with_its_reason():
    """vLLM takes X-Request-Id (or a body's request_id) at any length; the event carries it five times, so a
    200 KB id made the record too large for the broker, and the event was dropped after the response."""
    c = scheduler_half([])
    sp = SamplingParams(max_tokens=4)
    assert c.ensure_cache_available(request("x" * 1024, sp), 0) is True
    assert c.ensure_cache_available(request("x" * 1025, sp), 0) is False
    assert c.take_unavailable_requests() == {"x" * 1025}
    assert c._verdicts["x" * 1025][0] == ("its request id (X-Request-Id, or the body's request_id) is 1025 bytes, "
                                          "over 1024; its event could not be published")
