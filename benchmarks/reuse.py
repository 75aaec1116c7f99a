"""Engine throughput with ``reuse_stored_embeddings`` off vs on, when every image is already stored.

    .venv/bin/python benchmarks/reuse.py [--requests 96] [--rounds 3] [--quick] [--json PATH]

The model is a LLaVA built here (random weights, seeded; cached under ~/.cache/vllm-mm-events/models,
never committed) whose vision tower costs something on a CPU: CLIP hidden 384, 6 layers (vLLM runs
5: vision_feature_layer -2), 224x224 images, patch 14 -> 256 image features per request; the text
model stays tiny (Llama hidden 128, 2 heads, 2 layers), so the encoder is most of a request's cost.
float32 throughout (the stored objects are float32, the engine's dtype: loaded bit-exact).

1. populate: one engine with reuse on (so each object records its input digest) runs the N distinct
   images: the local ``file://`` object store then holds each one's encoder output.
2. rounds: fresh engines, one at a time, alternating reuse off / on (ABBA order over rounds): each
   warms up on one image of its own (not stored, so encoded in both modes), then times one
   ``LLM.generate`` of the same N requests (1 image, 8 output tokens, greedy); engine start and the
   warm-up are excluded. Off: the encoder runs for every item (the publisher still stores them:
   the store answers already_stored). On: each item is fetched, checked and loaded instead.

Each run's ``saves=`` (encoder runs) and ``loads=`` (items loaded from the store) come from its
worker's shutdown log line; both include the warm-up item (a save in either mode). The encoder's
cost per item is measured on its own (the vision tower + projector in transformers, one image,
this CPU's threads) and inferred from the two throughputs (1/off - 1/on per request = per hit).
``--quick``: a small vision tower (hidden 128, 2 layers, 112x112: 64 features), 8 requests,
one round per mode: proves the script runs (its figures mean little). ``--json PATH``: the rows.
``--reuse-wait-ms``: that setting for the reuse-on engines (a request waits at most this long for its
items' fetches, then encodes them); by default the connector's own default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
SIZES = {  # vision tower: hidden, layers, image size, patch
    "default": {"vision_hidden": 384, "vision_layers": 6, "image_size": 224, "patch": 14},
    "quick": {"vision_hidden": 128, "vision_layers": 2, "image_size": 112, "patch": 14},
}


# ---- the model ------------------------------------------------------------------------------------

def build_model(path: Path, *, vision_hidden: int, vision_layers: int, image_size: int, patch: int) -> Path:
    """tiny_llava's text model and tokenizer with a bigger CLIP vision tower. Skipped if built."""
    from publisher.vllm.demo import tiny_llava

    return tiny_llava.build(path, vision_hidden=vision_hidden, vision_layers=vision_layers, image_size=image_size,
                            patch=patch, max_positions=1024)


def image(seed: int, size: int):
    """A distinct, deterministic size x size RGB image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


class EncoderTimer:
    """The vision tower (the layers vLLM runs: all but the last, vision_feature_layer -2) + projector on one
    image, float32, in transformers on this CPU. Sampled between engine runs (never during one), so drift
    and other load on the machine spread over all samples; reported: median and min over all."""

    def __init__(self, model_dir: Path, size: int):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.torch = torch
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.pixel = AutoProcessor.from_pretrained(model_dir).image_processor(images=image(0, size),
                                                                              return_tensors="pt")["pixel_values"]
        layers = next(m for name, m in self.model.named_modules() if name.endswith("encoder.layers"))
        del layers[-1]  # hidden_states[-1] of the truncated tower == hidden_states[-2] of the whole one
        self.times: list[float] = []

    def sample(self, reps: int) -> None:
        with self.torch.inference_mode():
            for i in range(reps + 1):  # the first one warms up
                t0 = time.perf_counter()
                self.model.get_image_features(pixel_values=self.pixel, vision_feature_layer=-1,
                                              vision_feature_select_strategy="default")
                if i:
                    self.times.append((time.perf_counter() - t0) * 1000)

    def result(self) -> dict:
        return {"ms": statistics.median(self.times), "min_ms": min(self.times),
                "threads": self.torch.get_num_threads(), "reps": len(self.times)}


# ---- one engine, in its own process --------------------------------------------------------------

def worker(spec: dict) -> None:
    """In the subprocess: build the engine, warm up on one image of its own, time the N requests; prints JSON."""
    os.environ.update(ENV)
    from vllm import LLM, SamplingParams
    from vllm.config import ECTransferConfig

    from publisher.vllm.demo import tiny_llava

    ec = ECTransferConfig(ec_connector="MMEmbeddingPublisher", ec_role="ec_both",
                          ec_connector_extra_config=spec["extra"])
    llm = LLM(model=spec["model"], ec_transfer_config=ec, dtype="float32", max_model_len=spec["max_model_len"],
              enforce_eager=True, limit_mm_per_prompt={"image": 1}, seed=0)
    sp = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    size = spec["image_size"]

    def req(seed: int) -> dict:
        return {"prompt": tiny_llava.prompt(1), "multi_modal_data": {"image": image(seed, size)}}

    llm.generate([req(spec["warmup_seed"])], sp, use_tqdm=False)
    prompts = [req(s) for s in spec["seeds"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm  # shutdown: the connector flushes and logs its counts
    print("RESULT " + json.dumps({"rps": len(prompts) / dt, "seconds": dt, "tokens": tokens}), flush=True)


def run_engine(name: str, spec: dict, work: Path) -> dict:
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True,
                       env=dict(os.environ, **ENV), timeout=1200)
    (work / f"{name}.log").write_text(p.stdout + "\n" + p.stderr)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        sys.exit(f"{name} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    result = json.loads(line[7:])
    m = re.search(r"worker side stopped: saves=(\d+) loads=(\d+)", p.stderr)
    if m is None:
        sys.exit(f"{name}: no 'worker side stopped: saves=.. loads=..' line in its log ({work / f'{name}.log'})")
    result["saves"], result["loads"] = int(m[1]), int(m[2])
    r = re.search(r"mm-events reuse: (\{.*\})", p.stderr)
    result["reuse_log"] = r[1] if r else None
    result["wall_s"] = time.monotonic() - t0
    return result


def count_objects(root: Path) -> int:
    return sum(1 for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")
               and not f.name.endswith((".meta.json", ".tmp")))


# ---- the driver ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--requests", type=int, default=96, help="N: distinct images, one per request")
    ap.add_argument("--rounds", type=int, default=3, help="engines per mode (alternating off/on)")
    ap.add_argument("--quick", action="store_true", help="small vision tower, 8 requests, 1 round per mode")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    ap.add_argument("--model", help="a LLaVA directory to use (default: built under ~/.cache/vllm-mm-events)")
    ap.add_argument("--reuse-wait-ms", type=float,
                    help="the reuse_wait_ms setting for the reuse-on engines (default: the connector's default)")
    ap.add_argument("--encoder-reps", type=int, default=10,
                    help="timed encoder runs in transformers, before the engines and after each one")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    sizes = SIZES["quick" if args.quick else "default"]
    if args.quick:
        args.requests, args.rounds, args.encoder_reps = 8, 1, 3
    features = (sizes["image_size"] // sizes["patch"]) ** 2
    tag = "reuse-llava-v{vision_hidden}x{vision_layers}-{image_size}p{patch}".format(**sizes)
    model = Path(args.model) if args.model else build_model(
        Path.home() / ".cache" / "vllm-mm-events" / "models" / tag, **sizes)
    work = Path(tempfile.mkdtemp(prefix="mm-bench-reuse-"))
    store = work / "objects"
    n = args.requests
    seeds = list(range(1, n + 1))
    base = {"model": str(model), "seeds": seeds, "image_size": sizes["image_size"],
            "max_model_len": max(256, features + 64)}

    def extra(i: int, reuse: bool) -> dict:
        e = {"object_store": store.as_uri(), "event_sink": (work / f"events-{i}.avro").as_uri(), "spool_dir": "",
             "reuse_stored_embeddings": reuse}
        if reuse and args.reuse_wait_ms is not None:
            e["reuse_wait_ms"] = args.reuse_wait_ms
        return e

    print(f"model: CLIP vision hidden {sizes['vision_hidden']}, {sizes['vision_layers']} layers, "
          f"{sizes['image_size']}px/patch {sizes['patch']} -> {features} features; Llama hidden 128 x 2 layers; "
          f"float32, greedy, 8 output tokens; reuse_wait_ms {args.reuse_wait_ms or 'default'}; {n} requests, "
          f"1 distinct image each; {os.cpu_count()} CPUs; work {work}")
    timer = EncoderTimer(model, sizes["image_size"])
    timer.sample(args.encoder_reps)
    t0 = time.monotonic()
    pop = run_engine("populate", {**base, "extra": extra(0, True), "warmup_seed": 10**6}, work)
    stored = count_objects(store)
    print(f"  populate (reuse on, empty store): saves={pop['saves']} loads={pop['loads']}, {stored} objects stored "
          f"({pop['wall_s']:.0f}s)", flush=True)
    if stored < n:
        sys.exit(f"populate stored {stored} objects, expected at least {n}")

    order = [m for r in range(args.rounds) for m in (("off", "on") if r % 2 == 0 else ("on", "off"))]
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for i, mode in enumerate(order, start=1):
        res = run_engine(f"{i:02d}-{mode}", {**base, "extra": extra(i, mode == "on"), "warmup_seed": 10**6 + i}, work)
        runs[mode].append(res)
        timer.sample(args.encoder_reps)
        print(f"  {i}: reuse {mode:3s} {res['rps']:7.2f} req/s  saves={res['saves']} loads={res['loads']}"
              f"  ({res['wall_s']:.0f}s)" + (f"  reuse: {res['reuse_log']}" if mode == "on" else ""), flush=True)

    enc = timer.result()
    total = time.monotonic() - t0
    med = {m: statistics.median(r["rps"] for r in rs) for m, rs in runs.items()}
    ratio = med["on"] / med["off"]
    saving_ms = (1 / med["off"] - 1 / med["on"]) * 1000
    same = all(r["tokens"] == runs["off"][0]["tokens"] for rs in runs.values() for r in rs)
    expected = {"off": (n + 1, 0), "on": (1, n)}  # + the warm-up item, encoded in both modes
    ok = all((r["saves"], r["loads"]) == expected[m] for m, rs in runs.items() for r in rs)
    missed = [n - r["loads"] for r in runs["on"]]  # stored items encoded anyway: not fetched within reuse_wait_ms

    print(f"\nThroughput with every image already stored ({n} requests per round; saves/loads include the warm-up "
          f"item, encoded in both modes)\n")
    print("| mode | req/s per round | median req/s | ratio on/off | saves | loads |")
    print("|---|---|---|---|---|---|")
    for m in ("off", "on"):
        rs = runs[m]
        per_round = ", ".join(f"{r['rps']:.2f}" for r in rs)
        print(f"| reuse {m} | {per_round} | {med[m]:.2f} | "
              f"{ratio if m == 'on' else 1.0:.2f} | {', '.join(str(r['saves']) for r in rs)} | "
              f"{', '.join(str(r['loads']) for r in rs)} |")
    print(f"\nencoder per item (vision tower + projector, transformers, float32, {enc['threads']} threads): "
          f"{enc['ms']:.1f} ms median (min {enc['min_ms']:.1f}) over {enc['reps']} runs between the engines")
    print(f"saving per hit inferred from the throughputs (1/off - 1/on per request): {saving_ms:.1f} ms")
    print(f"counts as expected (off: saves=N+1 loads=0; on: saves=1 loads=N): {'yes' if ok else 'NO'}; stored "
          f"items encoded anyway with reuse on (fetch not ready within reuse_wait_ms): {missed}; "
          f"greedy outputs identical across all runs: {'yes' if same else 'NO'}; took {total:.0f}s")
    if args.json:
        rows = [{"kind": "reuse", "mode": m, "requests": n, "requests_per_s": med[m],
                 "rounds_per_s": [r["rps"] for r in runs[m]], "ratio_on_off": ratio if m == "on" else 1.0,
                 "saves": [r["saves"] for r in runs[m]], "loads": [r["loads"] for r in runs[m]],
                 "reuse_log": [r["reuse_log"] for r in runs[m]], "encoder_ms_per_item": enc["ms"],
                 "encoder_threads": enc["threads"], "encoder_min_ms": enc["min_ms"],
                 "saving_ms_per_hit_inferred": saving_ms,
                 "features_per_item": features, "reuse_wait_ms": args.reuse_wait_ms, "vision": sizes,
                 "dtype": "float32", "counts_ok": ok, "on_items_encoded_anyway": missed,
                 "outputs_identical": same, "populate": {"saves": pop["saves"], "loads": pop["loads"],
                                                         "objects": stored}} for m in ("off", "on")]
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
