"""Every modality, end to end on the real engine -> MinIO + Kafka -> the consumer: Qwen2-VL images of two
sizes and videos, Qwen2-Audio clips of two lengths (LLaVA images: test_offline_kafka_s3.py).

Each stored tensor is checked against an independent transformers reference on the same processed
input; each placeholder against the prompt's own tokens; each extra tensor against the processor's.
"""

from __future__ import annotations

import re
import uuid
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file

import consumer_run as cr
import tiny_qwen2_audio
import tiny_qwen2_vl
from pipeline import all_ids, consume, run_driver, source, stats_line

pytestmark = pytest.mark.e2e

# One generate call per family. Media entries: ["image", seed, width, height], ["video", seed, frames, width,
# height], ["audio", seed, seconds]; a request's images come first in its prompt, then its videos.
FAMILIES = {
    "qwen2_vl": [[
        {"media": [["image", 1, 56, 56], ["image", 2, 112, 56]], "extra_args": {"case": "two sizes"}},
        {"media": [["video", 3, 4, 56, 56]]},
        {"media": [["image", 4, 56, 56], ["video", 5, 6, 56, 56]]},  # 6 frames: temporal grid 3
    ]],
    "qwen2_audio": [[
        {"media": [["audio", 1, 1.0], ["audio", 2, 2.0]], "extra_args": {"case": "two lengths"}},
        {"media": [["audio", 3, 1.5]]},
    ]],
}
PAD_TOKEN = {"image": tiny_qwen2_vl.IMAGE_PAD, "video": tiny_qwen2_vl.VIDEO_PAD, "audio": tiny_qwen2_audio.AUDIO_TOKEN}


def expected_features(media: list) -> int:
    kind = media[0]
    if kind == "image":
        return tiny_qwen2_vl.num_features(media[2], media[3])
    if kind == "video":
        return tiny_qwen2_vl.num_features(media[3], media[4], frames=media[2])
    return tiny_qwen2_audio.num_features(media[2])


def expected_extras(media: list) -> dict[str, list]:
    """What the model needs besides the embedding to use it again: the (t, h, w) patch grid of an image or
    a video (Qwen2-VL's M-RoPE positions and the merger's layout); nothing for Qwen2-Audio."""
    kind = media[0]
    p = tiny_qwen2_vl.PATCH
    if kind == "image":
        return {"image_grid_thw": [1, media[3] // p, media[2] // p]}
    if kind == "video":
        return {"video_grid_thw": [-(-media[2] // tiny_qwen2_vl.TEMPORAL_PATCH), media[4] // p, media[3] // p]}
    return {}


def reference(model, media: list) -> torch.Tensor:
    kind = media[0]
    if kind == "image":
        return tiny_qwen2_vl.reference_image_features(model, tiny_qwen2_vl.random_image(media[1], *media[2:]))
    if kind == "video":
        return tiny_qwen2_vl.reference_video_features(model, tiny_qwen2_vl.random_video(media[1], *media[2:]))
    return tiny_qwen2_audio.reference_audio_features(model, tiny_qwen2_audio.random_audio(media[1], media[2]))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory, kafka, minio):
    family = request.param
    model = request.getfixturevalue("tiny_" + family)
    bucket = minio.create_bucket(f"mod-{uuid.uuid4().hex[:8]}")
    topic = f"vllm.mm-embeddings.{family}.{uuid.uuid4().hex[:6]}"
    # reuse on: objects record their input digest, so test_a_second_engine_loads_every_item can reuse them
    extra = {"object_store": f"s3://{bucket}/emb", "s3_endpoint_url": minio.endpoint,
             "event_sink": f"kafka://{kafka.bootstrap}/{topic}", "reuse_stored_embeddings": True,
             "reuse_wait_ms": 5000}  # exact counts below: no item may miss its load on a busy 2-core machine
    env = {k: v for k, v in minio.env.items() if k != "AWS_ENDPOINT_URL"}
    work = tmp_path_factory.mktemp(family)
    spec = {"model": str(model), "family": family, "extra_config": extra, "batches": FAMILIES[family],
            "temperature": 0.0}
    results, log = run_driver(spec, work, env=env)
    events = {e["request_id"]: e for e, _ in consume(kafka.bootstrap, topic, expected=len(results))}
    return dict(family=family, model=model, results=results, events=events, bucket=bucket, topic=topic,
                s3=minio.client(), out=work / "out", log=log,
                again=lambda name: run_driver(spec, tmp_path_factory.mktemp(name), env=env))


def get(run: dict, uri: str) -> bytes:
    u = urlsplit(uri)
    return run["s3"].get_object(Bucket=u.netloc, Key=u.path.lstrip("/"))["Body"].read()


def test_one_object_per_item_with_modality_shape_placeholder_and_extras(family_run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_run["model"])
    assert len(family_run["events"]) == len(family_run["results"])
    for r in family_run["results"]:
        e = family_run["events"][r["request_id"]]
        assert e["missing_embeddings"] == [] and len(e["embeddings"]) == len(r["media"])
        ids = r["prompt_token_ids"]
        end = -1
        for i, (item, media) in enumerate(zip(e["embeddings"], r["media"])):
            n = expected_features(media)
            assert item["item_index"] == i and item["modality"] == media[0] and item["source"] == "ENCODER"
            assert item["shape"] == [n, 128] and item["placeholder_length"] == n
            # The placeholder is exactly the run of the modality's pad token in the prompt, in item order.
            pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN[media[0]])
            start = item["placeholder_offset"]
            assert start > end and ids[start:start + n] == [pad] * n and ids[start + n] != pad
            end = start + n
            assert item["extra_tensors"] == sorted(expected_extras(media))
        # What the caller got back names the same objects.
        assert [p["uri"] for p in r["ec_transfer_params"]["mm_embeddings"]] == [x["uri"] for x in e["embeddings"]]
    listed = family_run["s3"].list_objects_v2(Bucket=family_run["bucket"])["Contents"]
    assert len(listed) == sum(len(r["media"]) for r in family_run["results"])  # all items distinct: an object each


def test_stored_tensors_equal_the_transformers_reference_and_the_processors_grids(family_run):
    for r in family_run["results"]:
        loaded = load_file(family_run["out"] / f"{r['request_id']}.safetensors")  # load_mm_embeddings' return
        for i, (item, media) in enumerate(zip(family_run["events"][r["request_id"]]["embeddings"], r["media"])):
            stored = load(get(family_run, item["uri"]))  # an independent reader: the safetensors library
            assert set(stored) == {"embedding", *item["extra_tensors"]}
            want = reference(family_run["model"], media)
            torch.testing.assert_close(stored["embedding"], want, rtol=1e-4, atol=1e-5)
            for name, grid in expected_extras(media).items():
                assert stored[name].tolist() == grid, name
                assert torch.equal(loaded[f"{i}.{name}"], stored[name])
            assert torch.equal(loaded[str(i)], stored["embedding"])
    # and not trivially: another item of the same modality gives another embedding
    first = family_run["results"][0]
    a, b = (load(get(family_run, x["uri"]))["embedding"]
            for x in family_run["events"][first["request_id"]]["embeddings"][:2])
    assert a.shape != b.shape or not torch.allclose(a, b)


def test_the_consumer_indexes_every_item(family_run, kafka, minio, tmp_path):
    from consumers.sinks import open_vector_sink
    from consumers.vectors import pool
    from schemas.objects import read_object

    env = {**minio.env, "VLLM_MM_EVENTS_S3_ENDPOINT_URL": minio.endpoint,
           "VLLM_MM_EVENTS_OBJECT_STORE": f"s3://{family_run['bucket']}"}
    sink_uri = f"lancedb://{tmp_path}/lance/{family_run['family']}"
    group = "mod-" + uuid.uuid4().hex[:6]
    summary, _ = cr.consume_once(["--source", source(kafka, family_run["topic"]), "--group", group, "--sink", sink_uri],
                                 env)
    items = sum(len(e["embeddings"]) for e in family_run["events"].values())
    n = len(family_run["events"])
    assert summary == {"consumed": n, "indexed": items, "committed": n, "dead_lettered": {}}
    sink = open_vector_sink(sink_uri)
    try:
        assert sink.count() == items
        assert len(sink.retrieve(sorted(all_ids(family_run["events"].values())))) == items
        for e in family_run["events"].values():
            for item in e["embeddings"]:
                query = pool(read_object(get(family_run, item["uri"])).to_float32(), "mean", False)
                top = sink.search(query, k=1)[0]
                assert top.payload["uri"] == item["uri"] and top.payload["modality"] == item["modality"]
                assert top.score == pytest.approx(1.0, abs=1e-4)
                assert np.isfinite(query).all()
    finally:
        sink.close()


def test_a_second_engine_loads_every_item_instead_of_encoding(family_run):
    """The store as a shared encoder cache for every modality: a second engine given the same media runs
    the encoder zero times (Qwen2-VL places each loaded image and video by the request's own grid)."""
    results, log = family_run["again"](f"{family_run['family']}-again")
    items = sum(len(r["media"]) for r in results)
    saves, loads = (int(x) for x in re.search(r"saves=(\d+) loads=(\d+)", stats_line(log, "worker")).groups())
    assert (saves, loads) == (0, items), stats_line(log, "worker")
    assert [r["token_ids"] for r in results] == [r["token_ids"] for r in family_run["results"]]  # greedy: same
    assert [p["uri"] for r in results for p in r["ec_transfer_params"]["mm_embeddings"]] == \
        [p["uri"] for r in family_run["results"] for p in r["ec_transfer_params"]["mm_embeddings"]]
