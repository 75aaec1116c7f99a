"""The OpenAI server's media-id guard, driven as the ASGI server drives it (chunked bodies included)."""

import asyncio
import json

import pytest

from publisher.vllm.api_guard import NamespaceClientMediaIds, RefuseClientMediaIds


def run(middleware_cls, body: bytes, chunk: int = 7, method: str = "POST"):
    """(status sent by the guard or None, the body the app received or None)."""
    got = {}

    async def app(scope, receive, send):
        parts, more = [], True
        while more:
            m = await receive()
            parts.append(m.get("body", b""))
            more = m.get("more_body", False)
        got["body"] = b"".join(parts)

    messages = [{"type": "http.request", "body": body[i:i + chunk], "more_body": i + chunk < len(body)}
                for i in range(0, max(len(body), 1), chunk)]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(m):
        sent.append(m)

    asyncio.run(middleware_cls(app)({"type": "http", "method": method}, receive, send))
    status = sent[0]["status"] if sent else None
    return status, got.get("body"), (json.loads(sent[1]["body"]) if sent else None)


CHAT_WITH_UUID = {"model": "m", "messages": [{"role": "user", "content": [
    {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:..."}, "uuid": "abc"}]}]}
PROMPT_WITH_UUIDS = {"prompt": "x", "multi_modal_uuids": {"image": ["u1", None]}}
PLAIN = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "uuid"}]}],
         "metadata": {"uuid": "not a media id"}}


@pytest.mark.parametrize("body,field", [(CHAT_WITH_UUID, "messages[0].content[1].uuid"),
                                        (PROMPT_WITH_UUIDS, "multi_modal_uuids")])
def test_media_ids_are_refused_with_the_field(body, field):
    status, passed, answer = run(RefuseClientMediaIds, json.dumps(body).encode())
    assert status == 400 and passed is None  # nothing reached the app
    assert answer["error"]["message"].startswith(f"{field}: caller-chosen media ids are refused")


def test_other_requests_pass_byte_for_byte():
    raw = json.dumps(PLAIN, indent=3).encode()
    for cls in (RefuseClientMediaIds, NamespaceClientMediaIds):
        assert run(cls, raw)[:2] == (None, raw)
        assert run(cls, b"not json {")[:2] == (None, b"not json {")
    assert run(RefuseClientMediaIds, json.dumps(CHAT_WITH_UUID).encode(), method="GET")[0] is None


def test_accepted_ids_are_namespaced_so_none_equals_a_content_hash():
    _, passed, _ = run(NamespaceClientMediaIds, json.dumps(CHAT_WITH_UUID).encode())
    assert json.loads(passed)["messages"][0]["content"][1]["uuid"] == "client-id:abc"
    _, passed, _ = run(NamespaceClientMediaIds, json.dumps(PROMPT_WITH_UUIDS).encode())
    assert json.loads(passed)["multi_modal_uuids"] == {"image": ["client-id:u1", None]}


@pytest.mark.parametrize("cls", [RefuseClientMediaIds, NamespaceClientMediaIds])
def test_a_body_over_the_cap_is_refused_unread_never_passed_on_unchecked(cls, monkeypatch):
    """Past the cap the guard used to stop reading and hand the bytes on unparsed: padding a request with
    whitespace carried its media ids past the guard (vLLM sets no body limit of its own)."""
    monkeypatch.setenv("VLLM_MM_EVENTS_API_MAX_BODY_BYTES", "4096")
    padded = json.dumps(CHAT_WITH_UUID).encode() + b" " * 5000
    status, passed, answer = run(cls, padded, chunk=1024)
    assert (status, passed) == (413, None)
    assert "over 4096 bytes" in answer["error"]["message"] and "VLLM_MM_EVENTS_API_MAX_BODY_BYTES" in \
        answer["error"]["message"]
    raw = json.dumps(PLAIN).encode()  # under the cap: as before
    assert run(cls, raw, chunk=1024)[:2] == (None, raw)
    monkeypatch.setenv("VLLM_MM_EVENTS_API_MAX_BODY_BYTES", "64k")
    with pytest.raises(ValueError, match="VLLM_MM_EVENTS_API_MAX_BODY_BYTES: expected a positive number"):
        cls(None)


def test_scale_out_generate_hashes_are_media_ids():
    """/inference/v1/generate takes features.mm_hashes beside processed tensors, used as the items' ids."""
    body = {"token_ids": [1, 2], "features": {"mm_hashes": {"image": ["0" * 64]}, "mm_placeholders": {}}}
    status, passed, answer = run(RefuseClientMediaIds, json.dumps(body).encode())
    assert (status, passed) == (400, None)
    assert answer["error"]["message"].startswith("features.mm_hashes: caller-chosen media ids are refused")


def test_a_json_schema_with_content_and_uuid_properties_is_not_a_media_id():
    """A response_format or tool schema describing {content: {uuid: ...}} was refused (or, namespaced,
    rewritten into another schema)."""
    schema = {"type": "object", "properties": {"content": {"type": "object", "properties": {"uuid": {
        "type": "string"}}}}}
    body = {**PLAIN, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    raw = json.dumps(body).encode()
    for cls in (RefuseClientMediaIds, NamespaceClientMediaIds):
        assert run(cls, raw, chunk=4096)[:2] == (None, raw)
    with_media = json.dumps({**CHAT_WITH_UUID, "response_format": body["response_format"]}).encode()
    assert run(RefuseClientMediaIds, with_media, chunk=4096)[0] == 400  # the media id beside it still is


def test_a_body_nested_past_json_depth_is_refused_and_the_guard_lives_on():
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for cls in (RefuseClientMediaIds, NamespaceClientMediaIds):
        status, passed, answer = run(cls, deep, chunk=1 << 16)
        assert (status, passed) == (400, None) and "nests deeper" in answer["error"]["message"]
    nested = {"messages": [{"role": "user", "content": [{"type": "image_url", "uuid": "x"}]}], "extra": [[[[[]]]]]}
    for _ in range(800):  # deep, yet within what json parses: checked all the same
        nested = {"a": nested}
    assert run(RefuseClientMediaIds, json.dumps(nested).encode(), chunk=1 << 16)[0] == 400
