"""Scheduler sidecar: tell a request that ended on a stop string from one that was aborted.

vLLM finds stop strings in its API process, after detokenizing: it answers the client (finish
``stop``, the string as ``stop_reason``, the tokens up to the one completing it) and only then
aborts the request in the engine, which may have generated a few more tokens meanwhile. The
connector only sees that abort, so for an aborted request with stop strings it sends what
vLLM's detokenizer worked on (``StopCheck``), and this module replays it here, off vLLM's loops:
the same incremental decoding (the ``tokenizers`` library's ``DecodeStream``, primed with the
prompt's end, or all of it where that end does not decode cleanly)
and the same stop-string rule (the earliest completed stop string, checked once past
``min_tokens``), one token at a time. The event then says what the client got.

Needs the model's fast tokenizer (``tokenizer.json``); without one (a slow tokenizer) the event
keeps the engine's view (``abort``), with a warning once.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from publisher.sidecar.events import FinishedRequest, StopCheck

log = logging.getLogger("vllm_mm_events.stop_strings")
PRIME_TOKENS = 32  # of the prompt's end that prime the decoder (a 2,000-token prompt costs 0.4 ms, 32 tokens 0.02)


def find_stop(tokenizer, check: StopCheck) -> tuple[int, str] | None:
    """(output tokens up to and including the one completing a stop string, that string), or None
    when no stop string occurs: then the request was really aborted."""
    from tokenizers.decoders import DecodeStream

    # vLLM primes its stream with the whole prompt; the decoded output depends on the prompt's end only,
    # unless that end does not decode cleanly (a character split across the cut): then the whole of it.
    prime = list(check.prompt_token_ids[-PRIME_TOKENS:])
    if len(check.prompt_token_ids) > PRIME_TOKENS and "\ufffd" in tokenizer.decode(
            prime, skip_special_tokens=check.skip_special_tokens):
        prime = list(check.prompt_token_ids)
    stream = DecodeStream(ids=prime, skip_special_tokens=check.skip_special_tokens)
    plain_spaces = check.skip_special_tokens or check.spaces_between_special_tokens
    added = {} if plain_spaces else {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    text, last_special = "", False
    for n, token in enumerate(check.output_token_ids, start=1):
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
    """Loads the model's fast tokenizer on first use and corrects aborted requests that ended on a
    stop string."""

    def __init__(self, tokenizer: str | None, revision: str | None = None):
        self._source, self._revision = tokenizer, revision
        self._tokenizer = None
        self._unavailable = tokenizer is None

    def resolve(self, req: FinishedRequest) -> FinishedRequest:
        check = req.stop_check
        if check is None:
            return req
        req = dataclasses.replace(req, stop_check=None)  # what the event and the spool keep
        tokenizer = self._load()
        if tokenizer is None:
            return req
        try:
            found = find_stop(tokenizer, check)
        except Exception as e:  # noqa: BLE001 - a surprise here must not cost the event
            log.warning("mm-events: could not check request %s for a stop string: %s", req.request_id, e)
            return req
        if found is None:
            return req
        n, stop = found
        return dataclasses.replace(req, finish_reason="stop", stop_reason=stop, num_output_tokens=n)

    def _load(self):
        if self._tokenizer is None and not self._unavailable:
            try:
                from tokenizers import Tokenizer

                path = os.path.join(self._source, "tokenizer.json")
                if not os.path.isdir(self._source):
                    from huggingface_hub import hf_hub_download

                    # vLLM fetched the tokenizer into the hub cache; never a download from here
                    path = hf_hub_download(self._source, "tokenizer.json", revision=self._revision,
                                           local_files_only=True)
                self._tokenizer = Tokenizer.from_file(path)
            except Exception as e:  # noqa: BLE001 - a slow tokenizer, or none reachable
                self._unavailable = True
                log.warning("mm-events: no fast tokenizer for %s (%s): requests that end on a stop string are "
                            "published as vLLM's engine saw them (finish_reason abort)", self._source, e)
        return self._tokenizer
