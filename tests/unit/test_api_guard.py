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
