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
rewritten) to the app. A body over ``VLLM_MM_EVENTS_API_MAX_BODY_BYTES`` (64 MiB) is answered 413
unread: passed on unchecked, it carried ids past the guard (vLLM sets no limit of its own).
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable

CLIENT_ID_PREFIX = "client-id:"
MAX_BODY_ENV = "VLLM_MM_EVENTS_API_MAX_BODY_BYTES"
MAX_BODY_BYTES = 64 << 20  # base64 media included; larger bodies are refused (413), never passed on unread
# Request fields that hold JSON schemas, not content: a property named "content" with one named "uuid"
# inside it is the caller's data model, not a media id (refused, or rewritten by the namespacing).
SCHEMA_FIELDS = frozenset({"response_format", "tools", "tool_choice", "structured_outputs", "guided_json", "text"})
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def media_id_fields(body: Any) -> list[tuple[str, list | dict]]:
    """Where a request body carries media ids: [(field path, the container holding it)]."""
    found: list[tuple[str, list | dict]] = []

    # Iterative: a body nested as deep as JSON parsers allow must not exhaust the guard's own stack.
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if not path and k in SCHEMA_FIELDS:
                    continue
                if k == "multi_modal_uuids" or (k == "uuid" and "content" in path) or (
                        k == "mm_hashes" and path == "features"):  # /inference/v1/generate (scale-out)
                    found.append((f"{path}.{k}" if path else k, node))
                else:
                    stack.append((v, f"{path}.{k}" if path else k))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
    return sorted(found, key=lambda f: f[0])


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
        self.max_body_bytes = max_body_bytes(os.environ)

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
            if size > self.max_body_bytes:
                return await _reject(send, f"the request body is over {self.max_body_bytes} bytes, the most this "
                                           f"server checks ({MAX_BODY_ENV})", 413)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # not JSON: the app answers it
        except RecursionError:
            return await _reject(send, "the request body nests deeper than JSON parsers read")
        if body is not None:
            error, changed = self.decide(body)
            if error:
                return await _reject(send, error)
            if changed is not None:
                raw = json.dumps(changed).encode()
        await self.app(scope, _replay([{"type": "http.request", "body": raw, "more_body": False}], receive), send)


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


def max_body_bytes(environ) -> int:
    """``VLLM_MM_EVENTS_API_MAX_BODY_BYTES``, checked: the server does not start on a value it cannot use."""
    text = environ.get(MAX_BODY_ENV)
    if text is None:
        return MAX_BODY_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_BODY_ENV}: expected a positive number of bytes, got {text[:40]!r}")
    return value


async def _reject(send: Send, error: str, status: int = 400) -> None:
    kind = "BadRequestError" if status == 400 else "RequestEntityTooLarge"
    body = json.dumps({"error": {"message": error, "type": kind, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
