"""The scheduler sidecar tells a request that ended on a stop string from an abort by replaying what
vLLM's API-side detokenizer does. Checked against vLLM's own detokenizer (FastIncrementalDetokenizer)
on random generations, with the tiny LLaVA's word-level tokenizer and a byte-level BPE tokenizer
trained here (multi-byte characters split across tokens, where incremental decoding is subtle)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer

from publisher.sidecar.events import FinishedRequest
from publisher.sidecar.messages import StopCheck
from publisher.sidecar.stop_strings import StopStringResolver, find_stop

CORPUS = ["the cat sat on the mat, naïve café résumé", "un été à Paris 🐈 et 🐕 jouent", "日本語のテキスト 123 456",
          "stop here. STOP there! end of text; ❤️ emoji ✅ done"] * 20


@pytest.fixture(scope="module")
def tokenizers(tiny_llava, tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<s>", "</s>"])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    bpe.save(str(path))
    return {"tiny-llava": Tokenizer.from_file(str(tiny_llava / "tokenizer.json")),
            "byte-level-bpe": Tokenizer.from_file(str(path))}


def vllm_says(tokenizer: Tokenizer, prompt: list[int], output: list[int], stop: list[str], min_tokens: int,
              skip_special_tokens: bool):
    """What vLLM's API process decides: (tokens the client gets, the stop string), or None."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    sp = SamplingParams(stop=stop, min_tokens=min_tokens, skip_special_tokens=skip_special_tokens, max_tokens=100)
    d = FastIncrementalDetokenizer(SimpleNamespace(_tokenizer=tokenizer),
                                   SimpleNamespace(sampling_params=sp, prompt_token_ids=prompt, request_id="r"))
    for n, token in enumerate(output, start=1):
        found = d.update([token], False)
        if found is not None:
            return n, found
    return None


@pytest.mark.parametrize("name", ["tiny-llava", "byte-level-bpe"])
def test_the_same_verdict_as_vllms_detokenizer(tokenizers, name):
    tok = tokenizers[name]
    rng = random.Random(7)
    vocab = tok.get_vocab_size()
    found = 0
    words = " ".join(CORPUS[:4]).split()
    for i in range(300):
        # Random ids (characters split anywhere, undecodable bytes) and text, prompts shorter and longer
        # than the part that primes the decoder.
        if i % 2:
            prompt = tok.encode(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 60)))).ids
        else:
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
        if i % 3:
            output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        else:
            output = tok.encode(" ".join(rng.choice(words) for _ in range(15))).ids
        text = tok.decode(output)
        stop = []
        for _ in range(rng.randrange(1, 3)):  # stop strings from the text itself, and one that is not in it
            if text and rng.random() < 0.8:
                i = rng.randrange(len(text))
                stop.append(text[i:i + rng.randrange(1, 5)])
            else:
                stop.append("\x07never")
        min_tokens, skip = rng.choice([0, 0, 3]), rng.random() < 0.8
        expected = vllm_says(tok, prompt, output, stop, min_tokens, skip)
        got = find_stop(tok, StopCheck(tuple(prompt[-1024:]), tuple(output), tuple(stop), min_tokens, skip))
        assert got == expected, (prompt, output, stop, min_tokens, skip)
        found += expected is not None
    assert found > 100  # most generations did end on one of their stop strings


def finished(reason: str, output: tuple[int, ...], stop: tuple[str, ...], **check) -> tuple[FinishedRequest, StopCheck]:
    """A finished request and its check, as the engine sends them."""
    return (FinishedRequest("r", "r-0", "m", reason, None, 5, len(output) + 4, {}, (), None, None, 1.0),
            StopCheck((1, 5), output, stop, **check))


def test_a_finish_that_was_a_stop_string_is_published_as_the_client_saw_it(tokenizers):
    tok = tokenizers["tiny-llava"]
    r = StopStringResolver(tok.to_str())
    output = tuple(tok.token_to_id(w) for w in ["a", "red", "cat", "and", "a", "dog", "on", "the"])
    # vLLM's abort after the stop string; or the engine reached max_tokens first (length); or an
    # end-of-sequence token after it (the engine's stop, without a string): the client got the stop string.
    for reason, extra in (("abort", {}), ("length", {}), ("stop", {"stop_terminated": True})):
        got = r.resolve(*finished(reason, output, ("cat and",), **extra))
        assert (got.finish_reason, got.stop_reason, got.num_output_tokens) == ("stop", "cat and", 4), reason
    real_abort = r.resolve(*finished("abort", output, ("green",)))  # the client went away: no stop string
    assert (real_abort.finish_reason, real_abort.stop_reason, real_abort.num_output_tokens) == ("abort", None, 12)
    # An end-of-sequence token is not decoded: a stop string it alone would complete is not one.
    eos_only = r.resolve(*finished("stop", output, ("the",), stop_terminated=True))
    assert (eos_only.finish_reason, eos_only.num_output_tokens) == ("stop", 12)
    plain, _ = finished("abort", output, ("cat",))
    assert r.resolve(plain, None) is plain


def test_the_decoder_is_primed_past_a_prompt_end_that_decodes_to_nothing(tokenizers):
    """A prompt ending in many placeholders skipped in decoding (an image's): the window widens until it
    holds text, as vLLM's whole-prompt priming does (the first output token's leading space)."""
    tok = tokenizers["tiny-llava"]
    prompt = tok.encode("what is in this picture").ids + [tok.token_to_id("<image>")] * 40
    output = [tok.token_to_id(w) for w in ["a", "cat", "and", "a", "dog"]]
    expected = vllm_says(tok, prompt, output, [" cat"], 0, True)
    assert expected == (2, " cat")
    assert find_stop(tok, StopCheck(tuple(prompt), tuple(output), (" cat",))) == expected


def test_without_a_fast_tokenizer_the_event_keeps_the_engines_view(caplog):
    r = StopStringResolver(None)  # vLLM's slow or mistral tokenizer modes
    got = r.resolve(*finished("abort", (5, 6, 7), ("a",)))
    assert (got.finish_reason, got.num_output_tokens) == ("abort", 7)
    assert "no fast tokenizer" in caplog.text
