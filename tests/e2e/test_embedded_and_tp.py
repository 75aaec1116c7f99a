"""End to end on the embedded defaults (no servers), then the same with tensor parallelism 2."""

import hashlib
import json
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors.torch import load_file

from pipeline import read_event_log, run_driver

pytestmark = pytest.mark.e2e

BATCHES = [
    [{"images": [11], "extra_args": {"k": "v"}}, {"images": [12, 13]}, {"images": []}],
    [{"images": [11]}],
]


def run_embedded(tmp_path_factory, tiny_llava, name, tp=1, env=None, module_path=None):
    work = tmp_path_factory.mktemp(name)
    # No object_store / event_sink given: the defaults, rooted in a fresh XDG_DATA_HOME.
    env = dict(env or {}, XDG_DATA_HOME=str(work / "data"), AWS_ENDPOINT_URL="")
    extra = {"publish_text_only": True}
    spec = {"model": str(tiny_llava), "extra_config": extra, "batches": BATCHES, "tp": tp}
    if module_path:
        spec["module_path"] = module_path
    results, log = run_driver(spec, work, env=env)
    root = work / "data" / "vllm-mm-events"
    return dict(results=results, log=log, events=read_event_log(root / "events.avro"), objects=root / "objects",
                out=work / "out")


@pytest.fixture(scope="module")
def tp1(tmp_path_factory, tiny_llava):
    # Loaded by ec_connector_module_path with vLLM's plugins switched off: the second way in.
    return run_embedded(tmp_path_factory, tiny_llava, "embedded", env={"VLLM_PLUGINS": "none"},
                        module_path="publisher.vllm.connector")


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
    for p in stored:  # metadata rides on the file (xattr) or, without xattrs, in a sidecar
        meta = json.loads(os.getxattr(p, "user.vllm_mm_events")) if not p.with_name(p.name + ".meta.json").exists() \
            else json.loads(p.with_name(p.name + ".meta.json").read_text())
        assert meta["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


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
