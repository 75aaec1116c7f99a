"""Every benchmark in one command, then one report: Markdown tables and charts.

    .venv/bin/python benchmarks/run_all.py [--quick] [--out DIR] [--only NAME,...]
    .venv/bin/python benchmarks/run_all.py --report ROWS.json [ROWS.json ...] --out DIR

Runs the benchmarks one after another (never two at once: they measure the same cores), each
with ``--json`` into DIR and its output in ``DIR/NAME.log``; each starts the servers it needs
(Kafka, MinIO, PostgreSQL) and stops them. Then writes:

- ``DIR/report.md``: a table per benchmark and the charts as Mermaid ``xychart-beta`` blocks
  (text, which GitHub renders: the README's Performance section is pasted from it, so no image
  is generated into the repository);
- ``DIR/*.png`` (matplotlib): throughput ratios per configuration, MB/s against upload threads,
  latency CDFs.

``--quick`` runs every benchmark's quick mode on tiny sizes (under 10 minutes here): it proves
the scripts and the report work; its figures mean nothing. The full run takes about 25 minutes
on 2 cores. ``--report`` renders the report from rows other runs wrote, without running anything.
A benchmark that fails is named in the report and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (arguments of the full run, of the quick run)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "s3_client": ([], ["--objects", "40"]),
    "publisher_bytes": ([], ["--quick"]),
    "consumer_throughput": ([], ["--quick"]),
    "publisher_throughput": (["--configs", "noop,local+kafka,s3+kafka", "--requests", "256", "--rounds", "3"],
                             ["--quick"]),
    "latency": ([], ["--quick"]),
    "reuse": ([], ["--quick"]),
}


def run(names: list[str], quick: bool, out: Path) -> tuple[list[dict], list[str]]:
    rows, failed = [], []
    for name in names:
        args = BENCHMARKS[name][1 if quick else 0]
        path = out / f"{name}.json"
        t0 = time.monotonic()
        print(f"[run_all] {name} {' '.join(args)}", flush=True)
        with open(out / f"{name}.log", "w") as log:
            p = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(path)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent)
        took = time.monotonic() - t0
        if p.returncode != 0 or not path.exists():
            failed.append(name)
            print(f"[run_all] {name} FAILED (exit {p.returncode}) after {took:.0f}s: see {out / f'{name}.log'}",
                  flush=True)
            continue
        print(f"[run_all] {name} done in {took:.0f}s", flush=True)
        rows.extend(json.loads(path.read_text()))
    return rows, failed


# ---- the report ------------------------------------------------------------------------------

def table(cols: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in body]
    return "\n".join(lines)


def mermaid_bars(title: str, labels: list[str], values: list[float], y_label: str) -> str:
    top = max([*values, 1.0]) * 1.1
    return "\n".join(["```mermaid", "xychart-beta", f'    title "{title}"',
                      "    x-axis [" + ", ".join(f'"{lb}"' for lb in labels) + "]",
                      f'    y-axis "{y_label}" 0 --> {top:.2f}',
                      "    bar [" + ", ".join(f"{v:.3f}" for v in values) + "]", "```"])


def mermaid_lines(title: str, x: list, series: list[list[float]], x_label: str, y_label: str) -> str:
    top = max([v for s in series for v in s] + [1.0]) * 1.1
    return "\n".join(["```mermaid", "xychart-beta", f'    title "{title}"',
                      "    x-axis \"" + x_label + "\" [" + ", ".join(f'"{v}"' for v in x) + "]",
                      f'    y-axis "{y_label}" 0 --> {top:.0f}',
                      *("    line [" + ", ".join(f"{v:.1f}" for v in s) + "]" for s in series), "```"])


def by_kind(rows: list[dict], kind: str) -> list[dict]:
    return [r for r in rows if r.get("kind") == kind]


def section_engine(rows: list[dict], charts: list) -> str:
    rs = by_kind(rows, "engine")
    if not rs:
        return ""
    def ratio(r, key):
        return f"{r[key]:.3f}" if r.get(key) is not None else "-"
    body = []
    for r in rs:
        spread = r.get("vs_noop_per_pass") or []
        cpu = r.get("cpu_us_per_request") or {}
        side = {k.split(": ")[1]: v for k, v in cpu.items() if k.startswith("sidecar")}
        rss = {k.split(": ")[1]: v for k, v in (r.get("peak_rss_mb") or {}).items() if k.startswith("sidecar")}
        hooks = r.get("hook_us_per_request") or {}
        body.append([r["config"], f"{r['requests_per_s']:.1f}", ratio(r, "vs_none"), ratio(r, "vs_noop"),
                     f"{min(spread):.3f}-{max(spread):.3f}" if spread else "-",
                     " / ".join(f"{side.get(k, 0):.0f}" for k in ("scheduler", "worker")) if side else "-",
                     " / ".join(f"{rss.get(k, 0):.0f}" for k in ("scheduler", "worker")) if rss else "-",
                     " / ".join(f"{hooks.get(k, 0):.0f}" for k in ("scheduler", "worker")) if hooks else "-"])
    with_noop = [r for r in rs if r.get("vs_noop") is not None]
    charts.append(("engine", "Engine throughput vs the no-op connector", [r["config"] for r in with_noop],
                   [r["vs_noop"] for r in with_noop]))
    return "\n\n".join([
        "### Engine throughput with the publisher (tiny LLaVA, one image per request)",
        table(["configuration", "req/s (median)", "vs no connector", "vs no-op", "spread vs no-op (per pass)",
               "sidecar CPU µs/request: scheduler / worker", "sidecar peak RSS MB: scheduler / worker",
               "µs/request on vLLM's threads: scheduler loop / model step"], body),
        mermaid_bars("Engine throughput, ratio to the no-op connector", [r["config"] for r in with_noop],
                     [r["vs_noop"] for r in with_noop], "ratio")])


def section_bytes(rows: list[dict], charts: list) -> str:
    rs = by_kind(rows, "bytes")
    if not rs:
        return ""
    body = [[r["object"], r["threads"], f"{r['sidecar_s3_MB_s']:.0f}", f"{r['sidecar_s3_MB_s'] / r['boto3_MB_s']:.2f}",
             f"{r['sidecar_s3_MB_s'] / r['lean_MB_s']:.2f}", f"{r['sidecar_local_MB_s']:.0f}",
             f"{r['sidecar_s3_cpu_s_per_GB']:.2f}", f"{r['sha256_MB_s']:.0f}"] for r in rs]
    objects = list(dict.fromkeys(r["object"] for r in rs))
    threads = sorted({r["threads"] for r in rs})
    scaled = [o for o in objects if len({r["threads"] for r in rs if r["object"] == o}) == len(threads)]
    parts = ["### Worker sidecar: MB/s storing encoder outputs",
             table(["object", "upload threads", "sidecar → S3 MB/s", "vs boto3", "vs lean client",
                    "sidecar → local MB/s", "CPU s/GB", "SHA-256 MB/s (1 core)"], body)]
    if len(threads) > 1 and scaled:
        series = [[next(r["sidecar_s3_MB_s"] for r in rs if r["object"] == o and r["threads"] == t)
                   for t in threads] for o in scaled]
        charts.append(("bytes_scaling", "Sidecar → S3 MB/s by upload threads", threads, dict(zip(scaled, series))))
        parts.append(mermaid_lines("Sidecar to S3, MB/s by upload threads (" + "; ".join(scaled) + ")", threads,
                                   series, "upload threads", "MB/s"))
    return "\n\n".join(parts)


def section_consumer(rows: list[dict], charts: list) -> str:
    rs = by_kind(rows, "throughput")
    parts = []
    if rs:
        body = [[r["sink"], r["size"], r["events"], f"{r['store_alone_points_per_s']:,.0f}",
                 f"{r['script_events_per_s']:,.1f}", f"{r['consumer_events_per_s']:,.1f}",
                 f"{r['consumer_MB_per_s']:,.0f}", f"{r['ratio_consumer_script']:.2f}",
                 f"{r['consumer_events_per_s_to_last_write'] / r['script_events_per_s']:.2f}",
                 f"{r['ratio_consumer_store_alone']:.2f}", f"{r['consumer_rss_growth_MB']:.0f}"] for r in rs]
        labels = [f"{r['sink']} {r['size']}" for r in rs]
        charts.append(("consumer", "Consumer vs the hand-written script", labels,
                       [r["ratio_consumer_script"] for r in rs]))
        parts += ["### Consumer against a hand-written script and the store alone (objects in MinIO)",
                  table(["sink", "object", "events", "store alone pts/s", "script ev/s", "consumer ev/s",
                         "consumer MB/s", "consumer / script", "the same, to its last write", "consumer / store",
                         "consumer RSS +MB"], body),
                  mermaid_bars("Consumer events/s, ratio to the hand-written script", labels,
                               [r["ratio_consumer_script"] for r in rs], "ratio")]
    sc = by_kind(rows, "scaling")
    if sc:
        body = [[r["sink"], r["size"], r["events"], f"{r['cli_1proc_events_per_s']:.1f}",
                 f"{r['cli_2proc_events_per_s']:.1f}", f"{r['speedup']:.2f}"] for r in sc]
        parts += ["Two consumer processes in one group:",
                  table(["sink", "object", "events", "1 process ev/s", "2 processes ev/s", "speedup"], body)]
    return "\n\n".join(parts)


def section_s3(rows: list[dict], charts: list) -> str:
    rs = by_kind(rows, "s3_call")
    if not rs:
        return ""
    body = [[r["call"], f"{r['object_bytes']:,}", f"{r['boto3_cpu_us']:,.0f}", f"{r['lean_cpu_us']:,.0f}",
             f"{r['ratio']:.2f}"] for r in rs]
    return "\n\n".join(["### S3 client CPU per call", table(["call", "object bytes", "boto3 CPU µs",
                                                              "S3LeanClient CPU µs", "ratio"], body)])


def section_latency(rows: list[dict], charts: list) -> str:
    rs = by_kind(rows, "latency")
    if not rs:
        return ""
    body = [[r["profile"], r["stage"], r.get("sink") or "-", r["n"], f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}",
             f"{r['p99_ms']:.0f}", f"{r['max_ms']:.0f}"] for r in rs]
    shown = [r for r in rs if r["stage"] in ("in_kafka", "searchable")]
    charts.append(("latency", "Latency from the request's finish", sorted({r["profile"] for r in shown}),
                   {(r["profile"], f"{r['stage']} {r.get('sink') or ''}".strip()): r.get("samples_ms") or []
                    for r in shown}))
    return "\n\n".join(["### Latency from a request's finish (ms)",
                        table(["profile", "to", "sink", "n", "p50", "p95", "p99", "max"], body)])


def section_reuse(rows: list[dict], charts: list) -> str:
    rs = by_kind(rows, "reuse")
    if not rs:
        return ""
    body = [[f"reuse {r['mode']}", ", ".join(f"{x:.2f}" for x in r["rounds_per_s"]), f"{r['requests_per_s']:.2f}",
             f"{r['ratio_on_off']:.2f}", ", ".join(map(str, r["saves"])), ", ".join(map(str, r["loads"]))] for r in rs]
    on = next(r for r in rs if r["mode"] == "on")
    charts.append(("reuse", "Engine throughput, every image stored: reuse_stored_embeddings off vs on",
                   [f"reuse {r['mode']}" for r in rs], [r["ratio_on_off"] for r in rs]))
    return "\n\n".join([
        "### Reusing stored embeddings: engine throughput, every image already stored",
        table(["mode", "req/s per round", "median req/s", "ratio on/off", "saves (encoder runs)", "loads"], body),
        f"Encoder per item {on['encoder_ms_per_item']:.1f} ms (transformers, {on['encoder_threads']} threads); saving "
        f"per hit from the throughputs {on['saving_ms_per_hit_inferred']:.1f} ms; {on['features_per_item']} features "
        f"per image; outputs identical: {'yes' if on['outputs_identical'] else 'NO'}."])


def render(rows: list[dict], failed: list[str], out: Path, quick: bool) -> Path:
    charts: list = []
    sections = [f(rows, charts) for f in (section_engine, section_bytes, section_s3, section_consumer,
                                          section_latency, section_reuse)]
    note = " (--quick: sizes too small to mean anything)" if quick else ""
    head = (f"## Benchmarks, {dt.date.today().isoformat()}{note}\n\n"
            f"{os.cpu_count()} CPUs; `benchmarks/run_all.py{' --quick' if quick else ''}`.")
    if failed:
        head += "\n\n**Failed:** " + ", ".join(failed) + " (see their logs)."
    report = out / "report.md"
    report.write_text("\n\n".join([head, *(s for s in sections if s)]) + "\n")
    pngs(charts, out)
    return report


def pngs(charts: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for name, title, x, y in charts:
        if name == "latency":  # one panel per profile: to Kafka, and to searchable in each sink
            fig, axes = plt.subplots(1, len(x), figsize=(6 * len(x), 4.5), sharey=True, squeeze=False)
            for ax, profile in zip(axes[0], x):
                for (p, label), samples in y.items():
                    if p == profile and samples:
                        v = np.sort(np.asarray(samples, dtype=float))
                        ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label,
                                linestyle="--" if label == "in_kafka" else "-")
                ax.set_xscale("log")
                ax.set_xlabel("ms from the request's finish")
                ax.set_title(f"{title}: {profile}")
                ax.legend(fontsize=8)
            axes[0][0].set_ylabel("fraction of requests")
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if name in ("engine", "consumer", "reuse"):
            ax.bar(range(len(x)), y, color="#4c72b0")
            ax.set_xticks(range(len(x)), x, rotation=30, ha="right")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylabel("ratio")
        elif name == "bytes_scaling":
            for label, series in y.items():
                ax.plot(x, series, marker="o", label=label)
            ax.set_xlabel("upload threads")
            ax.set_ylabel("MB/s")
            ax.set_xticks(x)
            ax.legend()
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every benchmark's quick mode (tiny sizes)")
    ap.add_argument("--only", help=f"comma-separated, of {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/<date-time>)")
    ap.add_argument("--report", nargs="+", type=Path, metavar="ROWS", help="render these JSON rows; run nothing")
    args = ap.parse_args()
    out = args.out or HERE / "results" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        rows = [r for p in args.report for r in json.loads(p.read_text())]
        failed = []
    else:
        names = args.only.split(",") if args.only else list(BENCHMARKS)
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
        rows, failed = run(names, args.quick, out)
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
    report = render(rows, failed, out, args.quick)
    print(report.read_text())
    print(f"[run_all] report: {report}; charts: {', '.join(p.name for p in sorted(out.glob('*.png')))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
