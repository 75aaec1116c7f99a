"""End to end: offline ``LLM.generate`` on the real engine -> MinIO objects + Kafka events."""

import hashlib
import re
import uuid
from urllib.parse import urlsplit

import pytest
import torch
from safetensors.torch import load, load_file

from pipeline import consume, run_driver, stats_line

pytestmark = pytest.mark.e2e

BATCHES = [
    [  # first call: 1 image, 2 images, text only
        {"images": [1], "extra_args": {"tenant": "acme", "trace_id": 7}},
        {"images": [2, 3], "extra_args": {"tenant": "globex"}},
        {"images": []},
    ],
    [  # second call: the first image again -> encoder-cache hit, no new encoder run
        {"images": [1], "extra_args": {"tenant": "acme", "again": True}},
    ],
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llava, kafka, minio):
    bucket = minio.create_bucket(f"e2e-{uuid.uuid4().hex[:8]}")
    topic = f"vllm.mm-embeddings.{uuid.uuid4().hex[:6]}"
    extra = {"object_store": f"s3://{bucket}/emb", "s3_endpoint_url": minio.endpoint,
             "event_sink": f"kafka://{kafka.bootstrap}/{topic}", "topic_partitions": 3}
    env = {k: v for k, v in minio.env.items() if k != "AWS_ENDPOINT_URL"}  # endpoint comes from the config
    results, log = run_driver({"model": str(tiny_llava), "extra_config": extra, "batches": BATCHES},
                              tmp_path_factory.mktemp("offline"), env=env)
    events = consume(kafka.bootstrap, topic, expected=3)
    return dict(results=results, log=log, events=events, bucket=bucket, s3=minio.client(), model=tiny_llava,
                out=tmp_path_factory.getbasetemp())


def by_request(run):
    return {e["request_id"]: (e, m) for e, m in run["events"]}


def test_one_event_per_media_request_none_for_text(run):
    media = [r for r in run["results"] if r["images"]]
    assert len(run["events"]) == len(media) == 3
    assert set(by_request(run)) == {r["request_id"] for r in media}
    text = next(r for r in run["results"] if not r["images"])
    assert text["ec_transfer_params"] is None and text["num_tensors"] == 0


def test_event_fields_match_the_request(run):
    events = by_request(run)
    for r in run["results"]:
        if not r["images"]:
            continue
        e, msg = events[r["request_id"]]
        assert msg.key() == r["request_id"].encode()
        assert re.fullmatch(re.escape(r["request_id"]) + r"-[0-9a-f]{8}", e["internal_request_id"])
        assert e["finish_reason"] == r["finish_reason"] == "length"
        assert e["num_output_tokens"] == r["num_output_tokens"] == 4
        assert e["num_prompt_tokens"] == r["num_prompt_tokens"]
        assert [x["item_index"] for x in e["embeddings"]] == list(range(len(r["images"])))
        assert e["missing_embeddings"] == []
        assert e["producer"]["engine"] == "vllm" and e["producer"]["engine_version"] == "0.32.0"
        headers = dict(msg.headers())
        assert headers["ce_id"].decode() == e["event_id"] and headers["ce_subject"].decode() == r["request_id"]


def test_extra_args_arrive_as_metadata(run):
    events = by_request(run)
    first = next(r for r in run["results"] if r["images"] == [1])
    assert events[first["request_id"]][0]["metadata"] == {"tenant": "acme", "trace_id": "7"}
    again = [r for r in run["results"] if r["images"] == [1]][1]
    assert events[again["request_id"]][0]["metadata"] == {"tenant": "acme", "again": "true"}


def test_objects_durable_with_checksum_size_and_metadata(run):
    seen = set()
    for e, _ in run["events"]:
        for ref in e["embeddings"]:
            u = urlsplit(ref["uri"])
            assert u.scheme == "s3" and u.netloc == run["bucket"]
            body = run["s3"].get_object(Bucket=u.netloc, Key=u.path.lstrip("/"))["Body"].read()
            assert hashlib.sha256(body).hexdigest() == ref["sha256"]
            assert len(body) == ref["size_bytes"]
            tensors = load(body)
            assert list(tensors) == ["embedding"]
            assert list(tensors["embedding"].shape) == ref["shape"] == [16, 128]
            assert ref["dtype"] == "float32" and ref["modality"] == "image"
            seen.add(ref["uri"])
    listed = run["s3"].list_objects_v2(Bucket=run["bucket"])["Contents"]
    assert len(listed) == len(seen) == 3  # three distinct images, each stored once


def test_repeated_image_same_object_and_no_new_encoder_run(run):
    events = by_request(run)
    firsts = [r for r in run["results"] if r["images"] == [1]]
    a, b = (events[r["request_id"]][0]["embeddings"][0] for r in firsts)
    assert a["uri"] == b["uri"] and a["sha256"] == b["sha256"] and a["mm_hash"] == b["mm_hash"]
    # 4 image items were sent, 3 distinct: the encoder ran (and save_caches fired) 3 times.
    assert "saves=3 " in stats_line(run["log"], "worker"), stats_line(run["log"], "worker")
    assert "'published': 3" in stats_line(run["log"], "scheduler")


def test_stored_tensor_equals_transformers_reference(run):
    from publisher.vllm.demo.tiny_llava import random_image, reference_image_features

    events = by_request(run)
    for r in run["results"]:
        for ref, seed in zip(events[r["request_id"]][0]["embeddings"] if r["images"] else [], r["images"]):
            u = urlsplit(ref["uri"])
            stored = load(run["s3"].get_object(Bucket=u.netloc, Key=u.path.lstrip("/"))["Body"].read())["embedding"]
            expected = reference_image_features(run["model"], random_image(seed))
            assert stored.shape == expected.shape
            torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-5)
            # and not trivially: different images give different embeddings
            assert not torch.allclose(stored, reference_image_features(run["model"], random_image(seed + 100)))


def test_ec_transfer_params_and_load_mm_embeddings_agree_with_the_event(run, tmp_path):
    events = by_request(run)
    out = next(run["out"].glob("offline*/out"))
    for r in run["results"]:
        if not r["images"]:
            continue
        e = events[r["request_id"]][0]
        params = r["ec_transfer_params"]
        assert params["event_id"] == e["event_id"]
        assert params["s3_endpoint_url"].startswith("http://127.0.0.1:")
        for p, ref in zip(params["mm_embeddings"], e["embeddings"]):
            for k in ("uri", "mm_hash", "modality", "item_index", "placeholder_offset", "placeholder_length",
                      "dtype"):
                assert p[k] == ref[k], k
        loaded = load_file(out / f"{r['request_id']}.safetensors")
        assert len(loaded) == len(e["embeddings"]) == r["num_tensors"]
        for i, ref in enumerate(e["embeddings"]):
            u = urlsplit(ref["uri"])
            stored = load(run["s3"].get_object(Bucket=u.netloc, Key=u.path.lstrip("/"))["Body"].read())
            assert torch.equal(loaded[str(i)], stored["embedding"])
