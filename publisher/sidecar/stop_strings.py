"""Scheduler sidecar: the finish of a request with stop strings, as vLLM's API process saw it.

vLLM finds stop strings in its API process, after detokenizing: it answers the client (finish
``stop``, the string as ``stop_reason``, the tokens up to the one completing it) and only then
aborts the request in the engine, which may have generated a few more tokens meanwhile, or
finished it otherwise by then (``max_tokens``, an end-of-sequence or stop token). The engine's
view is all the connector gets, so for a request with stop strings it sends what vLLM's
detokenizer worked on (``StopCheck``), and this module replays it here, off vLLM's loops: the
same incremental decoding (the ``tokenizers`` library's ``DecodeStream``, with the tokenizer vLLM
itself loaded, handed over at start) and the same stop-string rule (the earliest completed stop
string, checked once past ``min_tokens``), one token at a time. The event then says what the
client got. A request in which no stop string completes keeps the engine's view.

The engine cannot tell vLLM's stop-string abort from a client that went away: a client gone
before the tokens completing a stop string were answered gets an event saying ``stop`` at that
string, with those tokens. Where vLLM detokenizes with its slow detokenizer (no fast
tokenizer: ``slow`` or ``mistral`` tokenizer modes) nothing is replayed.
"""

from __future__ import annotations

import dataclasses
import logging

from publisher.sidecar.events import FinishedRequest
from publisher.sidecar.messages import StopCheck

log = logging.getLogger("vllm_mm_events.stop_strings")
# The prompt's end primes the decoder, as vLLM primes it with the whole prompt: the decoded output
# depends on a short left context only, once that context decodes cleanly (not empty: image
# placeholders skipped; no character split across the cut). Wider windows are tried in turn.
PRIME_WINDOWS = (32, 256)


def _prime(tokenizer, prompt: tuple[int, ...], skip_special_tokens: bool) -> list[int]:
    for n in PRIME_WINDOWS:
        if len(prompt) <= n:
            break
        text = tokenizer.decode(list(prompt[-n:]), skip_special_tokens=skip_special_tokens)
        if text.strip() and "\ufffd" not in text:
            return list(prompt[-n:])
    return list(prompt)


def find_stop(tokenizer, check: StopCheck, added_tokens: dict[int, str] | None = None) -> tuple[int, str] | None:
    """(output tokens up to and including the one completing a stop string, that string), or None
    when no stop string completes. ``added_tokens``: the tokenizer's added tokens by id (computed once
    by the caller; needed only without spaces between special tokens)."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=_prime(tokenizer, check.prompt_token_ids, check.skip_special_tokens),
                          skip_special_tokens=check.skip_special_tokens)
    plain_spaces = check.skip_special_tokens or check.spaces_between_special_tokens
    if not plain_spaces and added_tokens is None:
        added_tokens = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    added = {} if plain_spaces else added_tokens
    tokens = check.output_token_ids
    if check.stop_terminated and not check.include_stop_str_in_output:
        tokens = tokens[:-1]  # vLLM does not decode the end-of-sequence or stop token
    text, last_special = "", False
    for n, token in enumerate(tokens, start=1):
        before = len(text)
        try:
            piece = stream.step(tokenizer, token) or ""
        except Exception:  # noqa: BLE001 - vLLM resets its stream on an invalid prefix; do the same
            stream = DecodeStream(skip_special_tokens=check.skip_special_tokens)
            piece = stream.step(tokenizer, token) or ""
        if added:
            special = added.get(token)
            if special is not None and last_special:
                piece = special
            last_special = special is not None
        text += piece
        if n <= check.min_tokens or len(text) == before:
            continue
        best = None  # the stop string that completes earliest; ties: list order
        for s in check.stop:
            i = text.find(s, max(0, before + 1 - len(s)))
            if i != -1 and (best is None or i + len(s) < best[0]):
                best = (i + len(s), s)
        if best is not None:
            return n, best[1]
    return None


class StopStringResolver:
    """Corrects the finish of requests that ended on a stop string, with the tokenizer vLLM uses
    (its ``tokenizers`` JSON, sent by the connector; None where vLLM has no fast tokenizer)."""

    def __init__(self, tokenizer_json: str | None):
        self._tokenizer = self._added = None
        self._warned = False
        if tokenizer_json is not None:
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_str(tokenizer_json)
                self._added = {i: t.content for i, t in self._tokenizer.get_added_tokens_decoder().items()}
            except Exception as e:  # noqa: BLE001 - events keep the engine's view; the sidecar still starts
                log.warning("mm-events: cannot load vLLM's tokenizer (%s)", e)
                self._tokenizer = None

    def resolve(self, req: FinishedRequest, check: StopCheck | None) -> FinishedRequest:
        """``req`` as its client saw it: ended by a stop string when ``check`` finds one."""
        if check is None:
            return req
        if self._tokenizer is None:
            if not self._warned:
                self._warned = True
                log.warning("mm-events: no fast tokenizer from vLLM: requests that end on a stop string are "
                            "published as vLLM's engine saw them (an abort, or length)")
            return req
        try:
            found = find_stop(self._tokenizer, check, self._added)
        except Exception as e:  # noqa: BLE001 - a surprise here must not cost the event
            log.warning("mm-events: could not check request %s for a stop string: %s", req.request_id, e)
            return req
        if found is None:
            return req
        n, stop = found
        return dataclasses.replace(req, finish_reason="stop", stop_reason=stop, num_output_tokens=n)
