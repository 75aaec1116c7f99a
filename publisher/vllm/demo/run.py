"""The demo: the whole product on its embedded defaults, no servers.

1. real vLLM serves a few requests on a tiny random-weight LLaVA, with the publisher on;
2. each request's embeddings are objects in the local store and its event is in the local
   Avro log;
3. ``vllm-mm-events consume --once`` indexes them into the embedded vector store (LanceDB);
4. ``vllm-mm-events search --like <object>`` finds the requests that carried that image.

Steps 3 and 4 run the consumer's command line as a user would (the publisher never imports
the consumer). vLLM's own log goes to a file the demo names (``--verbose`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, TextIO


def _table(out: TextIO, header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, r in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths), file=out)


@contextlib.contextmanager
def _quiet(log_path: Path, verbose: bool) -> Iterator[None]:
    """Send this process's (and its children's) stdout/stderr to ``log_path`` meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    if verbose:
        yield
        return
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _cli() -> list[str]:
    """The consumer's console script beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "vllm-mm-events"
    found = str(beside) if beside.exists() else shutil.which("vllm-mm-events")
    return [found] if found else [sys.executable, "-c", "import sys; from consumers.cli import main; sys.exit(main())"]


def run_demo(workdir: str | None = None, num_requests: int = 4, verbose: bool = False, show_json: bool = False,
             index: bool = True) -> int:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from publisher.config import PublisherConfig, default_data_dir
    from publisher.vllm.demo import tiny_llava

    cache = Path(workdir) if workdir else Path.home() / ".cache" / "vllm-mm-events"
    defaults = PublisherConfig.load({})
    data = default_data_dir()
    data.mkdir(parents=True, exist_ok=True)
    log_path = data / "demo-vllm.log"
    out = sys.stdout
    print("vllm-mm-events demo: real vLLM on a tiny random-weight LLaVA, the publisher on its embedded defaults\n"
          f"  objects -> {defaults.object_store}\n  events  -> {defaults.event_sink}\n"
          f"  vLLM log -> {'this terminal' if verbose else log_path}\n", flush=True)

    # Fresh images each run (the log keeps earlier runs' events); request 3 repeats request 1's image.
    base = int.from_bytes(os.urandom(3), "little") * 10
    img = tiny_llava.random_image
    requests = [
        ({"prompt": tiny_llava.prompt(1), "multi_modal_data": {"image": img(base + 1)}}, {"user": "alice"}),
        ({"prompt": tiny_llava.prompt(2), "multi_modal_data": {"image": [img(base + 2), img(base + 3)]}},
         {"user": "bob"}),
        ({"prompt": tiny_llava.prompt(1), "multi_modal_data": {"image": img(base + 1)}},
         {"user": "carol", "note": "the same image as alice's"}),
        ({"prompt": "USER: describe the cat ASSISTANT:"}, {"user": "dave"}),
    ][:max(1, num_requests)]

    print("1. vLLM serves the requests (the encoder's outputs are captured as they are computed)", flush=True)
    with _quiet(log_path, verbose):
        from vllm import LLM, SamplingParams
        from vllm.config import ECTransferConfig

        from publisher import load_mm_embeddings

        model = tiny_llava.build(cache / "models" / "tiny-llava")
        # The one flag a user adds: the connector, on its embedded defaults.
        llm = LLM(model=str(model), max_model_len=256, enforce_eager=True, limit_mm_per_prompt={"image": 4},
                  ec_transfer_config=ECTransferConfig(ec_connector="MMEmbeddingPublisher", ec_role="ec_both"))
        outputs = llm.generate([p for p, _ in requests],
                               [SamplingParams(max_tokens=8, extra_args=x) for _, x in requests], use_tqdm=False)
        rows, event_ids, first_uri = [], {}, None
        for o, (_, meta) in zip(outputs, requests):
            tensors = load_mm_embeddings(o)
            params = o.ec_transfer_params or {}
            if params.get("event_id"):
                event_ids[params["event_id"]] = o.request_id
            refs = params.get("mm_embeddings", [])
            first_uri = first_uri or (refs[0]["uri"] if refs else None)
            rows.append([o.request_id, meta["user"], len(refs), " ".join(str(tuple(t.shape)) for t in tensors) or "-",
                         repr(o.outputs[0].text[:24])])
        del llm  # shutdown flushes the publisher
    _table(out, ["request", "metadata.user", "images", "embeddings (load_mm_embeddings)", "output"], rows)

    print(f"\n2. Published: one object per image, one event per request with media ({defaults.event_sink})")
    order = list(event_ids)
    events = sorted(_read_events(defaults.event_sink, set(event_ids)), key=lambda e: order.index(e["event_id"]))
    _table(out, ["event_id", "request", "items", "object", "missing"],
           [[e["event_id"][:8], e["request_id"], len(e["embeddings"]),
             " ".join(Path(r["uri"]).name[:12] + "..." for r in e["embeddings"]) or "-",
             len(e["missing_embeddings"])] for e in events])
    if show_json:
        for e in events:
            print(json.dumps(e, default=str, indent=1))
    if len(events) != len(event_ids):
        print(f"  expected {len(event_ids)} events, found {len(events)} in the log", file=sys.stderr)
        return 1

    if not index:
        return 0
    if importlib.util.find_spec("lancedb") is None:
        print("\n3. (skipped) indexing needs the consumer: pip install 'vllm-mm-events[consumers]'")
        return 0
    print("\n3. Indexed into the embedded vector store:  vllm-mm-events consume --once")
    p = subprocess.run([*_cli(), "consume", "--once", "--metrics-port", "0"], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        return p.returncode
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    _table(out, ["consumed", "indexed", "dead-lettered", "committed"],
           [[summary.get("consumed"), summary.get("indexed"), sum((summary.get("dead_lettered") or {}).values()),
             summary.get("committed")]])

    print(f"\n4. Search by image:  vllm-mm-events search --like {first_uri}")
    p = subprocess.run([*_cli(), "search", "--like", first_uri, "-k", "3", "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        return p.returncode
    hits = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    _table(out, ["rank", "score", "request", "metadata"],
           [[i, f"{h['score']:.4f}", h.get("request_id"), json.dumps(h.get("metadata") or {})]
            for i, h in enumerate(hits, 1)])
    print("\nalice's and carol's requests carried the same image: both come first, with score 1.0.\n"
          "Next: `vllm-mm-events events --format table` to read the event log, README for Kafka, S3 and Helm.")
    return 0


def _read_events(event_sink: str, event_ids: set[str]) -> list[dict]:
    """This run's events, from the local Avro log (an Avro object container file)."""
    import fastavro

    with open(event_sink.removeprefix("file://"), "rb") as f:
        return [e for e in fastavro.reader(f) if e["event_id"] in event_ids]


def main(argv: list[str] | None = None) -> int:
    """``vllm-mm-events-demo`` (and ``python -m publisher.vllm.demo``)."""
    p = argparse.ArgumentParser(
        prog="vllm-mm-events-demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The whole pipeline on the embedded defaults: real vLLM on a tiny model -> objects and events "
                    "-> an embedded vector store -> a search by image. No servers needed.",
        epilog="example:\n  vllm-mm-events-demo            # about a minute once set up\n"
               "  vllm-mm-events-demo --json     # also print every event in full\n"
               "data: $XDG_DATA_HOME/vllm-mm-events (default ~/.local/share/vllm-mm-events)")
    p.add_argument("--workdir", default=None, help="where the tiny model is built (default ~/.cache/vllm-mm-events)")
    p.add_argument("--requests", type=int, default=4, help="how many of the four demo requests to send")
    p.add_argument("--json", action="store_true", help="print each event in full")
    p.add_argument("--verbose", action="store_true", help="show vLLM's own log here instead of in a file")
    p.add_argument("--no-index", dest="index", action="store_false", help="stop after publishing")
    args = p.parse_args(argv)
    return run_demo(args.workdir, args.requests, args.verbose, args.json, args.index)


if __name__ == "__main__":
    sys.exit(main())
