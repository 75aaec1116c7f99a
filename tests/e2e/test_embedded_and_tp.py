"""End to end on the embedded defaults (no servers), then the same with tensor parallelism 2."""

import hashlib
import json
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import read_event_log, run_driver

pytestmark = pytest.mark.e2e

BATCHES = [
    [{"images": [11], "extra_args": {"k": "v"}}, {"images": [12, 13]}, {"images": []}],
    [{"images": [11]}],
]


def run_embedded(tmp_path_factory, tiny_llava, name, tp=1, env=None, module_path=None, dtype="float32"):
    work = tmp_path_factory.mktemp(name)
    # No object_store / event_sink / storage_dtype given: the defaults, rooted in a fresh XDG_DATA_HOME.
    env = dict(env or {}, XDG_DATA_HOME=str(work / "data"), AWS_ENDPOINT_URL="", ENCODER_TAP_DIR=str(work / "tap"))
    extra = {"publish_text_only": True}
    spec = {"model": str(tiny_llava), "extra_config": extra, "batches": BATCHES, "tp": tp, "dtype": dtype}
    if module_path:
        spec["module_path"] = module_path
    results, log = run_driver(spec, work, env=env)
    root = work / "data" / "vllm-mm-events"
    return dict(results=results, log=log, events=read_event_log(root / "events.avro"), objects=root / "objects",
                out=work / "out", tap=work / "tap")


@pytest.fixture(scope="module")
def tp1(tmp_path_factory, tiny_llava):
    # Loaded by ec_connector_module_path with vLLM's plugins switched off: the second way in.
    return run_embedded(tmp_path_factory, tiny_llava, "embedded", env={"VLLM_PLUGINS": "none"},
                        module_path="publisher.vllm.connector")


@pytest.fixture(scope="module")
def bf16(tmp_path_factory, tiny_llava):
    # The model in bfloat16 (the CPU build runs it), the default storage_dtype (native), and the
    # encoder_tap connector: the publisher plus a copy of each encoder output as vLLM handed it over.
    return run_embedded(tmp_path_factory, tiny_llava, "bf16", env={"VLLM_PLUGINS": "none"},
                        module_path="encoder_tap", dtype="bfloat16")


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, tiny_llava):
    return run_embedded(tmp_path_factory, tiny_llava, "tp2", tp=2, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})


def local_path(uri: str) -> Path:
    u = urlsplit(uri)
    assert u.scheme == "file"
    return Path(unquote(u.path))


def test_embedded_defaults_need_no_server(tp1):
    assert "mm-events scheduler side started" in tp1["log"]
    events = {e["request_id"]: e for e in tp1["events"]}
    assert len(events) == 4  # publish_text_only: the text request has an event too
    for r in tp1["results"]:
        e = events[r["request_id"]]
        assert len(e["embeddings"]) == len(r["images"]) and e["missing_embeddings"] == []
        for ref in e["embeddings"]:
            body = local_path(ref["uri"]).read_bytes()
            assert hashlib.sha256(body).hexdigest() == ref["sha256"] and len(body) == ref["size_bytes"]
        if r["images"]:
            assert [p["uri"] for p in r["ec_transfer_params"]["mm_embeddings"]] == [x["uri"] for x in e["embeddings"]]
            assert "s3_endpoint_url" not in r["ec_transfer_params"]
        else:
            assert r["ec_transfer_params"] == {"mm_embeddings": [], "event_id": e["event_id"]}
    stored = sorted(p for p in tp1["objects"].rglob("*.safetensors"))
    assert len(stored) == 3 and not list(tp1["objects"].rglob("*.tmp"))
    # storage_dtype defaults to native: a float32 model stores float32, and keys, events and params say so
    assert all(p.parent.name == "float32" for p in stored)
    assert {ref["dtype"] for e in tp1["events"] for ref in e["embeddings"]} == {"float32"}
    assert {e["producer"]["storage_dtype"] for e in tp1["events"]} == {"float32"}
    assert {p["dtype"] for r in tp1["results"] for p in (r["ec_transfer_params"] or {}).get("mm_embeddings", [])} \
        == {"float32"}
    for p in stored:  # metadata rides on the file (xattr) or, without xattrs, in a sidecar
        meta = json.loads(os.getxattr(p, "user.vllm_mm_events")) if not p.with_name(p.name + ".meta.json").exists() \
            else json.loads(p.with_name(p.name + ".meta.json").read_text())
        assert meta["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


def test_native_dtype_stores_the_bf16_encoder_output_unconverted(bf16):
    """storage_dtype=native (the default) on a bfloat16 model: both halves resolve it to bfloat16, so
    the key the scheduler computed is where the worker stored, and every name of the dtype (key,
    event, params, object metadata) is the concrete one. The stored tensor is the encoder's output
    bit for bit; load_mm_embeddings returns it as bfloat16; the torch-free consumer widens it exactly."""
    from consumers.objects import verify_and_decode

    tapped = {p.stem: torch.load(p) for p in bf16["tap"].glob("*.pt")}
    assert len(tapped) == 3 and {t.dtype for t in tapped.values()} == {torch.bfloat16}
    events = {e["request_id"]: e for e in bf16["events"]}
    assert {e["producer"]["storage_dtype"] for e in events.values()} == {"bfloat16"}
    seen = set()
    for r in bf16["results"]:
        e = events[r["request_id"]]
        assert e["missing_embeddings"] == [] and len(e["embeddings"]) == len(r["images"])
        params = r["ec_transfer_params"]["mm_embeddings"]
        loaded = load_file(bf16["out"] / f"{r['request_id']}.safetensors") if r["images"] else {}
        for i, (ref, p) in enumerate(zip(e["embeddings"], params)):
            assert ref["dtype"] == p["dtype"] == "bfloat16" and p["uri"] == ref["uri"]
            path = local_path(ref["uri"])
            assert path.parent.name == "bfloat16"  # the key names the resolved dtype
            body = path.read_bytes()
            expected = tapped[ref["mm_hash"]]
            stored = load_file(path)["embedding"]
            assert stored.dtype == torch.bfloat16 and torch.equal(stored, expected)  # no conversion
            assert body.endswith(expected.contiguous().view(torch.uint8).numpy().tobytes())
            meta = json.loads(body[8:8 + int.from_bytes(body[:8], "little")])["__metadata__"]
            assert meta["dtype"] == meta["encoder_dtype"] == "bfloat16"
            assert loaded[str(i)].dtype == torch.bfloat16 and torch.equal(loaded[str(i)], expected)
            widened = verify_and_decode(ref, body)
            assert widened.dtype == np.float32 and np.array_equal(widened, expected.float().numpy())
            seen.add(path)
    assert len(seen) == 3 and seen == set(bf16["objects"].rglob("*.safetensors"))


def test_tp2_stores_each_item_once(tp2):
    stored = list(tp2["objects"].rglob("*.safetensors"))
    assert len(stored) == 3
    workers = [ln for ln in tp2["log"].splitlines() if "mm-events worker side stopped" in ln]
    assert len(workers) == 2, workers  # both ranks ran the connector
    uploaded = sorted(int(re.search(r"'uploaded': (\d+)", ln).group(1)) for ln in workers)
    assert uploaded == [0, 3]  # rank 0 uploads, rank 1 only sees the saves
    assert all("saves=3 " in ln for ln in workers)


def test_tp2_event_same_as_tp1(tp1, tp2):
    def normalized(run):
        out = {}
        for e in run["events"]:
            refs = [{k: v for k, v in ref.items() if k not in ("uri", "sha256")} for ref in e["embeddings"]]
            rels = [str(local_path(ref["uri"]).relative_to(run["objects"])) for ref in e["embeddings"]]
            out[e["request_id"]] = dict(refs=refs, rels=rels, metadata=e["metadata"], model=e["model"],
                                        finish=e["finish_reason"], counts=(e["num_prompt_tokens"],
                                                                           e["num_output_tokens"]))
        return out

    assert normalized(tp1) == normalized(tp2)
    # and the tensors agree (TP shards the math, so allow float32 round-off)
    ev1 = {e["request_id"]: e for e in tp1["events"]}
    ev2 = {e["request_id"]: e for e in tp2["events"]}
    for rid, e in ev1.items():
        for a, b in zip(e["embeddings"], ev2[rid]["embeddings"]):
            ta = load_file(local_path(a["uri"]))["embedding"]
            tb = load_file(local_path(b["uri"]))["embedding"]
            torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)


def test_return_params_ids_shows_callers_no_store_locations(tmp_path, tiny_llava):
    """return_params=ids: the caller gets the event id and item hashes; the event names the objects."""
    extra = {"return_params": "ids", "object_store": (tmp_path / "objects").as_uri(),
             "event_sink": (tmp_path / "events.avro").as_uri(), "spool_dir": str(tmp_path / "spool")}
    results, _ = run_driver({"model": str(tiny_llava), "extra_config": extra, "batches": [[{"images": [40, 41]}]]},
                            tmp_path / "run")
    (params,) = [r["ec_transfer_params"] for r in results]
    assert set(params) == {"event_id", "mm_embeddings"}
    assert [sorted(ref) for ref in params["mm_embeddings"]] == [["item_index", "mm_hash", "modality", "source"]] * 2
    assert str(tmp_path) not in json.dumps(params)  # no server paths, no endpoint
    (event,) = read_event_log(tmp_path / "events.avro")
    assert event["event_id"] == params["event_id"]
    assert [i["mm_hash"] for i in event["embeddings"]] == [r["mm_hash"] for r in params["mm_embeddings"]]
    assert all(local_path(i["uri"]).is_file() for i in event["embeddings"])
    with pytest.raises(ValueError, match="return_params=ids"):
        from publisher import load_mm_embeddings

        load_mm_embeddings(params)
