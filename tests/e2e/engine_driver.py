"""Runs real vLLM offline with the publisher, in its own process (the engine spawns workers).

    python engine_driver.py spec.json

spec: {"model", "extra_config", "tp", "dtype" (float32 unless given), "out", "family" (llava unless given),
       "temperature" (1.0 unless given; 0 is greedy),
       "batches": [[{"images": [seed, ...], "extra_args": {...}}]]}
Other families (``qwen2_vl``, ``qwen2_audio``: tests/support/tiny_*.py) take
``{"media": [["image", seed, width, height], ["video", seed, frames, width, height], ["audio", seed, seconds]]}``.
Each batch is one ``LLM.generate`` call, so a later batch sees the encoder cache of earlier ones.
Writes ``out/results.json`` and, per request, ``out/<request_id>.safetensors`` holding what
``load_mm_embeddings`` returned.
"""

import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # the tiny model builders


def llava_prompt(r: dict) -> dict:
    from publisher.vllm.demo import tiny_llava

    seeds = r.get("images", [])
    p = {"prompt": tiny_llava.prompt(len(seeds)) if seeds else "USER: describe the cat ASSISTANT:"}
    if seeds:
        p["multi_modal_data"] = {"image": [tiny_llava.random_image(s) for s in seeds]}
    return p


def qwen2_vl_prompt(r: dict) -> dict:
    import tiny_qwen2_vl as m

    images = [m.random_image(seed, w, h) for kind, seed, w, h in (x for x in r["media"] if x[0] == "image")]
    videos = [m.random_video(seed, frames, w, h) for kind, seed, frames, w, h in (x for x in r["media"]
                                                                                   if x[0] == "video")]
    data = {k: v for k, v in (("image", images), ("video", videos)) if v}
    return {"prompt": m.prompt(len(images), len(videos)), "multi_modal_data": data}


def qwen2_audio_prompt(r: dict) -> dict:
    import tiny_qwen2_audio as m

    audios = [m.random_audio(seed, seconds) for _, seed, seconds in r["media"]]
    return {"prompt": m.prompt(len(audios)), "multi_modal_data": {"audio": audios}}


FAMILIES = {"llava": (llava_prompt, {"image": 4}), "qwen2_vl": (qwen2_vl_prompt, {"image": 4, "video": 2}),
            "qwen2_audio": (qwen2_audio_prompt, {"audio": 4})}


def reader_args(extra: dict) -> dict:
    """What the caller of load_mm_embeddings knows: its own endpoint and local store, never the params'."""
    store = extra.get("object_store", "")
    args = {"endpoint_url": extra.get("s3_endpoint_url")}
    if store.startswith("file://"):
        args["local_dirs"] = [urlsplit(store).path]
    return args


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from safetensors.torch import save_file
    from vllm import LLM, SamplingParams
    from vllm.config import ECTransferConfig

    from publisher import load_mm_embeddings

    make_prompt, limits = FAMILIES[spec.get("family", "llava")]
    ec = ECTransferConfig(ec_connector="MMEmbeddingPublisher", ec_role="ec_both",
                          ec_connector_extra_config=spec["extra_config"],
                          ec_connector_module_path=spec.get("module_path"))
    llm = LLM(model=spec["model"], ec_transfer_config=ec, tensor_parallel_size=spec.get("tp", 1),
              dtype=spec.get("dtype", "float32"), max_model_len=spec.get("max_model_len", 256), enforce_eager=True,
              limit_mm_per_prompt=limits, seed=0)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for batch in spec["batches"]:
        prompts, params = [], []
        for r in batch:
            prompts.append(make_prompt(r))
            params.append(SamplingParams(max_tokens=r.get("max_tokens", 4), extra_args=r.get("extra_args"),
                                         temperature=spec.get("temperature", 1.0)))
        for r, o in zip(batch, llm.generate(prompts, params, use_tqdm=False)):
            refs = (o.ec_transfer_params or {}).get("mm_embeddings") or []
            located = all("uri" in ref for ref in refs)  # return_params=ids names no locations
            pairs = load_mm_embeddings(o, timeout=60, with_extras=True, **reader_args(spec["extra_config"])) \
                if located else []
            tensors = [t for t, _ in pairs]
            if tensors:
                loaded = {str(i): t.contiguous() for i, t in enumerate(tensors)}
                loaded.update({f"{i}.{name}": x.contiguous() for i, (_, extras) in enumerate(pairs)
                               for name, x in extras.items()})
                save_file(loaded, out / f"{o.request_id}.safetensors")
            results.append({"request_id": o.request_id, "images": r.get("images", []), "media": r.get("media", []),
                            "finish_reason": o.outputs[0].finish_reason,
                            "num_output_tokens": len(o.outputs[0].token_ids),
                            "token_ids": list(o.outputs[0].token_ids),
                            "num_prompt_tokens": len(o.prompt_token_ids),
                            "prompt_token_ids": list(o.prompt_token_ids),
                            "ec_transfer_params": o.ec_transfer_params, "num_tensors": len(tensors)})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    del llm  # engine shutdown: the connector flushes pending work


if __name__ == "__main__":
    main()
