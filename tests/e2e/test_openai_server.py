"""End to end through vLLM's OpenAI server: ec_transfer_params in the body, vllm_xargs in the event,
and client-supplied embeddings refused unless allowed."""

import uuid

import pytest
import torch

from openai_server import OpenAIServer, image_embeds_part, image_part
from pipeline import consume, read_event_log, stats_line

pytestmark = pytest.mark.e2e
TEXT = {"type": "text", "text": "what is in this image ?"}


@pytest.fixture(scope="module")
def default_server(tmp_path_factory, tiny_llava, kafka, minio):
    """The production shape: MinIO + Kafka, client embeddings refused (the default)."""
    bucket = minio.create_bucket(f"api-{uuid.uuid4().hex[:8]}")
    topic = f"api-events-{uuid.uuid4().hex[:6]}"
    extra = {"object_store": f"s3://{bucket}/p", "s3_endpoint_url": minio.endpoint,
             "event_sink": f"kafka://{kafka.bootstrap}/{topic}", "topic_partitions": 1}
    env = {k: v for k, v in minio.env.items() if k != "AWS_ENDPOINT_URL"}
    guard = ("--middleware", "publisher.vllm.api_guard.RefuseClientMediaIds")  # as the Helm chart installs it
    server = OpenAIServer(tiny_llava, extra, tmp_path_factory.mktemp("api-default"), env=env,
                          extra_args=guard).wait_ready()
    yield dict(server=server, topic=topic, kafka=kafka, aws_env=env, endpoint=minio.endpoint)
    server.stop()


@pytest.fixture(scope="module")
def allowing_server(tmp_path_factory, tiny_llava):
    work = tmp_path_factory.mktemp("api-allow")
    extra = {"object_store": (work / "objects").as_uri(), "event_sink": (work / "events.avro").as_uri(),
             "allow_client_embeddings": True}
    server = OpenAIServer(tiny_llava, extra, work).wait_ready()
    yield dict(server=server, work=work)
    server.stop()


def test_chat_with_image_returns_params_and_event_carries_xargs(default_server, monkeypatch):
    from publisher.vllm.demo.tiny_llava import random_image

    s = default_server["server"]
    r = s.chat([image_part(random_image(21)), TEXT], vllm_xargs={"tenant": "acme", "ticket": 42})
    assert r.status_code == 200, r.text
    body = r.json()
    params = body["ec_transfer_params"]
    assert len(params["mm_embeddings"]) == 1 and params["mm_embeddings"][0]["modality"] == "image"
    (event, msg), = consume(default_server["kafka"].bootstrap, default_server["topic"], expected=1)
    assert event["request_id"] == body["id"] and msg.key() == body["id"].encode()
    assert event["model"] == "tiny-llava"
    assert event["metadata"] == {"tenant": "acme", "ticket": "42"}
    assert event["embeddings"][0]["uri"] == params["mm_embeddings"][0]["uri"]
    assert event["num_output_tokens"] == body["usage"]["completion_tokens"]
    assert event["num_prompt_tokens"] == body["usage"]["prompt_tokens"]

    from publisher import load_mm_embeddings

    for k, v in default_server["aws_env"].items():  # credentials from the AWS chain, no AWS_ENDPOINT_URL
        monkeypatch.setenv(k, v)
    assert params["s3_endpoint_url"] == default_server["endpoint"]
    with pytest.raises(ValueError, match="not one you allowed"):  # a response body does not choose the endpoint
        load_mm_embeddings(params)
    (t,) = load_mm_embeddings(params, allowed_endpoints=[default_server["endpoint"]])
    assert t.shape == (16, 128)


def test_client_embeddings_refused_by_default(default_server):
    s = default_server["server"]
    r = s.chat([image_embeds_part(torch.randn(16, 128)), TEXT])
    assert r.status_code != 200 or r.json()["choices"][0]["finish_reason"] == "error", r.text
    assert "arrived as client-supplied embeddings" in s.log()
    # the server stays up and serves the next request
    from publisher.vllm.demo.tiny_llava import random_image

    assert s.chat([image_part(random_image(22)), TEXT]).status_code == 200


def test_hostile_xargs_refused_or_harmless_and_the_engine_stays_up(default_server):
    """Oversized metadata is refused up front (never published without its event); a caller-chosen
    media id is refused by the API guard; NUL characters travel as they came; the server keeps serving."""
    from publisher.vllm.demo.tiny_llava import random_image

    s = default_server["server"]
    big = s.chat([image_part(random_image(23)), TEXT], vllm_xargs={"blob": "x" * (20 << 10)})
    assert big.status_code != 200 or big.json()["choices"][0]["finish_reason"] == "error", big.text
    assert "over max_metadata_bytes" in s.log()
    forged = s.chat([{**image_part(random_image(26)), "uuid": "0" * 64}, TEXT])  # an id of the caller's choosing
    assert forged.status_code == 400 and "caller-chosen media ids are refused" in forged.text, forged.text
    nul = s.chat([image_part(random_image(24)), TEXT], vllm_xargs={"note": "a\u0000b", "k\u0000": "v"})
    assert nul.status_code == 200, nul.text
    after = s.chat([image_part(random_image(25)), TEXT])
    assert after.status_code == 200, after.text
    events = [e for e, _ in consume(default_server["kafka"].bootstrap, default_server["topic"], expected=4)]
    by_id = {e["request_id"]: e for e in events}
    assert nul.json()["id"] in by_id and after.json()["id"] in by_id and len(events) == 4
    assert by_id[nul.json()["id"]]["metadata"] == {"note": "a\x00b", "k\x00": "v"}
    assert not any(e["metadata"].get("blob") for e in events)  # the refused request published nothing


def test_client_embeddings_allowed_and_marked(allowing_server):
    s = allowing_server["server"]
    embeds = torch.randn(16, 128)
    r = s.chat([image_embeds_part(embeds), TEXT], vllm_xargs={"who": "client"})
    assert r.status_code == 200, r.text
    params = r.json()["ec_transfer_params"]
    assert params["mm_embeddings"][0]["source"] == "CLIENT"
    log = s.stop()
    assert "'published': 1" in stats_line(log, "scheduler")
    (event,) = read_event_log(allowing_server["work"] / "events.avro")
    assert event["embeddings"][0]["source"] == "CLIENT" and event["metadata"] == {"who": "client"}

    from publisher import load_mm_embeddings

    (t,) = load_mm_embeddings(params, local_dirs=[allowing_server["work"] / "objects"])
    torch.testing.assert_close(t, embeds)  # what was stored is what the client sent, and says so


@pytest.fixture
def embedded_server(tmp_path, tiny_llava):
    """The embedded defaults (local store, event log), a server of its own."""
    extra = {"object_store": (tmp_path / "objects").as_uri(), "event_sink": (tmp_path / "events.avro").as_uri()}
    server = OpenAIServer(tiny_llava, extra, tmp_path).wait_ready()
    yield dict(server=server, work=tmp_path)
    server.stop()


def test_a_request_the_client_abandons_is_published_as_aborted(embedded_server):
    """A client that closes its stream mid-generation: vLLM aborts the request. Its event goes out
    with no other request running after it, says ``abort``, and names its stored object."""
    import json
    import time

    import requests

    from publisher.vllm.demo.tiny_llava import random_image

    s, log = embedded_server["server"], embedded_server["work"] / "events.avro"
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": [image_part(random_image(23)), TEXT]}],
            "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with requests.post(f"{s.url}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith(b"data: "))
        request_id = json.loads(first[len(b"data: "):])["id"]
    # the connection is closed: the server aborts the request
    deadline, mine = time.monotonic() + 30, []
    while time.monotonic() < deadline and not mine:
        time.sleep(0.5)
        try:
            events = read_event_log(log) if log.exists() else []
        except (EOFError, ValueError):  # a block the sidecar is still appending
            continue
        mine = [e for e in events if e["request_id"] == request_id]
    assert len(mine) == 1, f"no event for the abandoned request {request_id} within 30 s"
    assert mine[0]["finish_reason"] == "abort" and mine[0]["num_output_tokens"] < 200, mine[0]
    assert len(mine[0]["embeddings"]) == 1 and not mine[0]["missing_embeddings"]


def test_a_request_ended_by_a_stop_string_is_published_as_the_client_saw_it(embedded_server):
    """vLLM's API process finds stop strings, answers, then aborts the request in the engine (which
    may run on for a few tokens). The event says what the client got: ``stop``, the string, its token
    count; a run of the same request without it says ``length``."""
    import time

    from publisher.vllm.demo.tiny_llava import random_image

    s, log = embedded_server["server"], embedded_server["work"] / "events.avro"
    content = [image_part(random_image(29)), TEXT]
    sampling = dict(max_tokens=24, ignore_eos=True, temperature=1.0)  # seeded: the same tokens every time
    for seed in range(20):  # the tiny model's text: a seed whose generation has words to stop on
        free = s.chat(content, seed=seed, **sampling).json()
        text = free["choices"][0]["message"]["content"]
        if len(text.strip()) >= 8:
            break
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a string the same generation reaches halfway
    cut = s.chat(content, seed=seed, stop=[stop], **sampling).json()
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["choices"][0]["stop_reason"] == stop, cut
    deadline, events = time.monotonic() + 30, {}
    while time.monotonic() < deadline and not {free["id"], cut["id"]} <= events.keys():
        time.sleep(0.5)
        try:
            events = {e["request_id"]: e for e in read_event_log(log)} if log.exists() else {}
        except (EOFError, ValueError):  # a block the sidecar is still appending
            continue
    assert (events[free["id"]]["finish_reason"], events[free["id"]]["num_output_tokens"]) == ("length", 24)
    e = events[cut["id"]]
    assert (e["finish_reason"], e["stop_reason"], e["num_output_tokens"]) == (
        "stop", stop, cut["usage"]["completion_tokens"]), (e, cut["usage"])
    assert e["num_output_tokens"] < 24 and len(e["embeddings"]) == 1
