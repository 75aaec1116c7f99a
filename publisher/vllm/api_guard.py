"""ASGI middleware for vLLM's OpenAI server (``--middleware``): caller-chosen media ids.

vLLM uses a caller's media id (``uuid`` on a chat content part, ``multi_modal_uuids`` on a
prompt) as the item's ``mm_hash``, which is also the object key, first writer wins. A caller
could send image Y under the id of image X, and later events for X would name Y's embedding.
The connector cannot tell a caller's id from vLLM's content hash, so the door is closed here,
where the request is still JSON:

- ``RefuseClientMediaIds`` (the default to install): a request carrying media ids is answered
  400, naming the field; nothing reaches the engine.
- ``NamespaceClientMediaIds`` (``allow_client_media_ids``): ids are accepted, prefixed with
  ``client-id:`` so that no caller id can equal a content hash; objects of caller ids live
  under keys of their own. Callers that use the same id share its object, as media ids mean.

    vllm serve ... --middleware publisher.vllm.api_guard.RefuseClientMediaIds

Pure ASGI, no vLLM import: the body is read once, checked, and handed on unchanged (or
rewritten) to the app.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

CLIENT_ID_PREFIX = "client-id:"
MAX_BODY_BYTES = 64 << 20  # larger bodies are passed on unread; vLLM's own limits apply to them
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def media_id_fields(body: Any) -> list[tuple[str, list | dict]]:
    """Where a request body carries media ids: [(field path, the container holding it)]."""
    found: list[tuple[str, list | dict]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "multi_modal_uuids" or (k == "uuid" and "content" in path):
                    found.append((f"{path}.{k}" if path else k, node))
                else:
                    walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(body, "")
    return found


def _namespaced(value: Any) -> Any:
    if isinstance(value, str):
        return CLIENT_ID_PREFIX + value
    if isinstance(value, list):
        return [_namespaced(v) for v in value]
    if isinstance(value, dict):
        return {k: _namespaced(v) for k, v in value.items()}
    return value  # None: no id for that item


class _BodyGuard:
    """Reads a POST's JSON body once; ``decide(body) -> (error or None, body to pass on)``."""

    def __init__(self, app):
        self.app = app

    def decide(self, body: Any) -> tuple[str | None, Any]:
        """(an error to answer 400 with, or None; the body to pass on, or None to pass the bytes as they came)."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_BODY_BYTES:
                break
        raw = b"".join(chunks)
        if not more:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None  # not JSON: the app answers it
            if body is not None:
                error, changed = self.decide(body)
                if error:
                    return await _reject(send, error)
                if changed is not None:
                    raw = json.dumps(changed).encode()
        await self.app(scope, _replay([{"type": "http.request", "body": raw, "more_body": more}], receive), send)


class RefuseClientMediaIds(_BodyGuard):
    def decide(self, body: Any) -> tuple[str | None, Any]:
        fields = media_id_fields(body)
        if fields:
            return (f"{fields[0][0]}: caller-chosen media ids are refused on this server (they would name "
                    "stored embeddings the caller's media did not produce); send the media without ids"), None
        return None, None


class NamespaceClientMediaIds(_BodyGuard):
    def decide(self, body: Any) -> tuple[str | None, Any]:
        fields = media_id_fields(body)
        for path, holder in fields:
            key = path.rsplit(".", 1)[-1]
            holder[key] = _namespaced(holder[key])
        return None, body if fields else None


def _replay(messages: list[dict], receive: Receive) -> Receive:
    async def replayed() -> dict:
        return messages.pop(0) if messages else await receive()
    return replayed


async def _reject(send: Send, error: str) -> None:
    body = json.dumps({"error": {"message": error, "type": "BadRequestError", "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
