"""Engine throughput with and without the publisher, in one run.

    .venv/bin/python benchmarks/publisher_throughput.py [--requests 512] [--rounds 5] [--quick] [--json PATH]

Every request carries a distinct image, so each one runs the encoder and publishes: the
worst case, since the tiny model itself costs almost nothing. Each configuration runs in
a fresh engine (a subprocess); within it, ``--rounds`` timed rounds of ``--requests``
requests follow one warm-up round, and the median round counts. Configurations:

  none          no connector
  noop          a connector that does nothing (ec_both): vLLM's own connector plumbing
  local+kafka   the publisher: local directory store + Apache Kafka, durable outbox (spool) on
  local+kafka-nospool   the same with the outbox off (spool_dir "")
  local+kafka-durable   the same with durable_before_return (each response waits for its spool fsync)
  s3+kafka      the publisher: MinIO + Apache Kafka (servers share the 2 cores: a floor)

Prints requests/s and the ratios against no connector and against the no-op connector (with
the spread: each pass's median against the same pass's no-op), CPU per request by process and,
for configurations with a spool, the window between a request's finish and its spool record
being fsynced (the publisher's ``spool_lag_seconds`` histogram, scraped from its /metrics).
The publisher runs as ``timed_connector.TimedPublisher``, which clocks every hook vLLM calls: the
time the connector takes on vLLM's own threads (the scheduler loop, the model step) per request,
the part of its cost that no spare core can take away.
``--quick``: no-op and local+kafka, 32 requests, one round, one pass (proves it runs).
``--json PATH``: the rows as a JSON list of dicts (``"kind": "engine"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))


def worker(spec: dict) -> None:
    """In the subprocess: one engine, warm-up + timed rounds; prints JSON."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import ECTransferConfig

    from publisher.vllm.demo import tiny_llava

    ec = None
    if spec["connector"] == "noop":
        ec = ECTransferConfig(ec_connector="NoopConnector", ec_role="ec_both",
                              ec_connector_module_path="noop_connector")
    elif spec["connector"] == "publisher":
        ec = ECTransferConfig(ec_connector="TimedPublisher", ec_role="ec_both",
                              ec_connector_module_path="timed_connector", ec_connector_extra_config=spec["extra"])
    llm = LLM(model=spec["model"], ec_transfer_config=ec, max_model_len=256, enforce_eager=True,
              limit_mm_per_prompt={"image": 1}, seed=0)
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    n, base = spec["requests"], spec["seed_base"]
    times = []
    cpu0 = None
    for rnd in range(spec["rounds"] + 1):
        prompts = [{"prompt": tiny_llava.prompt(1),
                    "multi_modal_data": {"image": tiny_llava.random_image(base + rnd * n + i)}} for i in range(n)]
        if rnd == 1:
            cpu0 = cpu_by_process()
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        if rnd:  # round 0 warms up
            times.append(n / dt)
    time.sleep(0.5)  # let the sidecars finish the last round
    cpu1 = cpu_by_process()
    peak_rss = peak_rss_by_process()
    lag = spool_lag(spec["extra"]["metrics_port"]) if spec.get("extra", {}).get("spool_dir") else None
    total = n * spec["rounds"]
    cpu_us = {k: (cpu1.get(k, 0) - cpu0.get(k, 0)) / total * 1e6 for k in cpu1}
    del llm
    print("RESULT " + json.dumps({"rps": times, "cpu_us_per_request": cpu_us, "spool_lag": lag,
                                  "peak_rss_mb": peak_rss}), flush=True)


def spool_lag(port: int) -> dict[str, float]:
    """Mean and bucket-bound p50/p99 of the publisher's spool_lag_seconds histogram, in ms."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    name = "vllm_mm_events_publisher_spool_lag_seconds"
    fam = next(f for f in text_string_to_metric_families(text) if f.name == name)
    buckets = sorted((float(x.labels["le"]), x.value) for x in fam.samples if x.name.endswith("_bucket"))
    count = next(x.value for x in fam.samples if x.name.endswith("_count"))
    total = next(x.value for x in fam.samples if x.name.endswith("_sum"))

    def quantile(q: float) -> float:
        return next(le for le, n in buckets if n >= q * count) * 1000

    return {"n": count, "mean_ms": total / count * 1000 if count else 0.0, "p50_le_ms": quantile(0.5),
            "p99_le_ms": quantile(0.99)}


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user+system) so far, by role: this process, EngineCore, workers, sidecars."""
    import psutil

    out: dict[str, float] = {}
    for role, p in processes():
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def peak_rss_by_process() -> dict[str, float]:
    """Peak resident set (VmHWM, MB) by role, the largest process of each role; shared pages (the
    memfd ring, the model's weights) count in every process that touched them."""
    out: dict[str, float] = {}
    for role, p in processes():
        try:
            with open(f"/proc/{p.pid}/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            continue
        out[role] = max(out.get(role, 0.0), hwm)
    return out


def processes() -> list[tuple[str, object]]:
    """(role, psutil.Process) for this process, its children and the publisher's sidecars."""
    import psutil

    me = psutil.Process()
    out = []
    # The sidecars detach from the engine's process tree, so find them by command line.
    sidecars = [p for p in psutil.process_iter(["cmdline"])
                if "publisher.sidecar.process" in " ".join(p.info["cmdline"] or [])]
    for p in {q.pid: q for q in [me, *me.children(recursive=True), *sidecars]}.values():
        try:
            cmd = " ".join(p.cmdline())
            name = p.name()
        except psutil.Error:
            continue
        if p.pid == me.pid:
            role = "client (LLM.generate)"
        elif "publisher.sidecar.process" in cmd and " worker " in cmd:
            role = "sidecar: worker"
        elif "publisher.sidecar.process" in cmd and " scheduler " in cmd:
            role = "sidecar: scheduler"
        elif "EngineCore" in name or "EngineCore" in cmd:
            role = "EngineCore (scheduler)"
        elif "Worker" in name or "Worker" in cmd:
            role = "model worker"
        else:
            role = "other: " + name
        out.append((role, p))
    return out


def hook_times(directory: str, requests: int) -> dict[str, dict[str, float]]:
    """What timed_connector wrote: per role, µs per request inside the connector's hooks (wall, CPU)."""
    out: dict[str, dict[str, float]] = {}
    for f in Path(directory).glob("*.json"):
        d = json.loads(f.read_text())
        role = out.setdefault(d["role"], {"wall_us": 0.0, "cpu_us": 0.0})
        for h in d["hooks"].values():
            role["wall_us"] += h["wall_s"] / requests * 1e6
            role["cpu_us"] += h["cpu_s"] / requests * 1e6
    return out


def run_config(name: str, spec: dict, env: dict) -> tuple[list[float], dict[str, float], dict | None, dict, dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    hooks_dir = tempfile.mkdtemp(prefix="mm-hooks-")
    p = subprocess.run([sys.executable, __file__, "--worker", f.name], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(HERE), MM_EVENTS_HOOK_TIMES=hooks_dir, **env),
                       timeout=1200)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        sys.exit(f"{name} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    for ln in p.stderr.splitlines():
        if "side stopped" in ln:
            print(f"      {ln.split('] ', 1)[-1]}")
    result = json.loads(line[7:])
    if result.get("spool_lag"):
        lag = result["spool_lag"]
        print(f"      spool lag (finish -> fsynced): mean {lag['mean_ms']:.2f} ms, p50 <= {lag['p50_le_ms']:g} ms, "
              f"p99 <= {lag['p99_le_ms']:g} ms over {lag['n']:.0f} requests")
    hooks = hook_times(hooks_dir, spec["requests"] * (spec["rounds"] + 1))  # the warm-up round is clocked too
    if hooks:
        print("      on vLLM's threads, inside the connector: " + ", ".join(
            f"{role} {t['wall_us']:.0f} µs/request (CPU {t['cpu_us']:.0f})" for role, t in sorted(hooks.items())))
    return (result["rps"], result["cpu_us_per_request"], result.get("spool_lag"), result.get("peak_rss_mb") or {},
            hooks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", default="none,noop,local+kafka,s3+kafka")
    ap.add_argument("--repeat", type=int, default=2,
                    help="passes over the configurations (alternating order), to average out drift")
    ap.add_argument("--quick", action="store_true", help="noop,local+kafka; 32 requests, 1 round, 1 pass")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    ap.add_argument("--model", help="the tiny LLaVA's directory (default: built under ~/.cache/vllm-mm-events)")
    ap.add_argument("--bootstrap", help="use this running Kafka (host:port) instead of starting one")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    if args.quick:
        args.requests, args.rounds, args.repeat, args.configs = 32, 1, 1, "noop,local+kafka"

    from publisher.vllm.demo import tiny_llava

    import services

    work = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    model = args.model or str(tiny_llava.build(Path.home() / ".cache" / "vllm-mm-events" / "models" / "tiny-llava"))
    configs = args.configs.split(",")
    started = None
    if args.bootstrap:
        kafka = services.RunningKafka(args.bootstrap)
    elif any("kafka" in c for c in configs):
        kafka = started = services.KafkaBroker().start()
    else:
        kafka = None
    minio = services.MinioServer().start() if any("s3" in c for c in configs) else None
    print(f"servers: {kafka.name if kafka else '-'} / {minio.name if minio else '-'}")
    print(f"{args.requests} requests x {args.rounds} rounds per configuration, 1 distinct image each, "
          f"8 output tokens, {os.cpu_count()} CPUs")
    results: dict[str, list[float]] = {}
    per_pass: dict[tuple[int, str], float] = {}  # (pass, configuration) -> median req/s
    lags: dict[str, dict] = {}
    peak: dict[str, dict[str, float]] = {}  # configuration -> role -> peak RSS MB
    cpu: dict[str, list[dict]] = {}
    hook_us: dict[str, dict[str, list[float]]] = {}  # configuration -> role -> µs/request on vLLM's threads
    order = [(p, c) for p in range(args.repeat) for c in (configs if p % 2 == 0 else configs[::-1])]
    try:
        for i, (pass_no, name) in enumerate(order):
            spec = {"model": model, "requests": args.requests, "rounds": args.rounds, "seed_base": i * 10**6,
                    "connector": {"none": None, "noop": "noop"}.get(name, "publisher")}
            env = {}
            topic = f"bench-{uuid.uuid4().hex[:6]}"
            if name in ("local+kafka", "local+kafka-nospool", "local+kafka-durable"):
                spool = "" if name.endswith("nospool") else str(work / f"spool-{i}")
                spec["extra"] = {"object_store": (work / "objects").as_uri(), "spool_dir": spool,
                                 "durable_before_return": name.endswith("durable"),
                                 "metrics_port": services.free_port(), "metrics_host": "127.0.0.1",
                                 "event_sink": f"kafka://{kafka.bootstrap}/{topic}"}
            elif name == "s3+kafka":
                bucket = minio.create_bucket(f"bench-{uuid.uuid4().hex[:6]}")
                spec["extra"] = {"object_store": f"s3://{bucket}/b", "s3_endpoint_url": minio.endpoint,
                                 "event_sink": f"kafka://{kafka.bootstrap}/{topic}"}
                env = minio.env
            elif name == "local+file":
                spec["extra"] = {"object_store": (work / "objects2").as_uri(),
                                 "event_sink": (work / "events.avro").as_uri()}
            rps, cpu_us, lag, rss, hooks = run_config(name, spec, env)
            for role, t in hooks.items():
                hook_us.setdefault(name, {}).setdefault(role, []).append(t["wall_us"])
            roles_peak = peak.setdefault(name, {})
            for role, mb in rss.items():
                roles_peak[role] = max(roles_peak.get(role, 0.0), mb)
            results.setdefault(name, []).extend(rps)
            per_pass[(pass_no, name)] = statistics.median(rps)
            if lag:
                lags[name] = lag
            cpu.setdefault(name, []).append(cpu_us)
            print(f"  pass {pass_no + 1} {name:12s} {statistics.median(rps):7.1f} req/s "
                  f"(rounds: {', '.join(f'{x:.0f}' for x in rps)})", flush=True)
    finally:
        if started:
            started.stop()
        if minio:
            minio.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    print("\nThroughput (median of all timed rounds; spread: each pass against that pass's no-op)")
    print("configuration    req/s   vs none   vs noop   spread vs noop")
    rows = []
    for k, v in med.items():
        vs_none = v / med["none"] if "none" in med else float("nan")
        vs_noop = v / med["noop"] if "noop" in med else float("nan")
        spread = [per_pass[(p, k)] / per_pass[(p, "noop")] for p in range(args.repeat) if (p, "noop") in per_pass]
        spread_txt = f"{min(spread):.3f}-{max(spread):.3f}" if spread else "-"
        print(f"{k:14s} {v:7.1f}   {vs_none:7.3f}   {vs_noop:7.3f}   {spread_txt}")
        rows.append({"kind": "engine", "config": k, "requests_per_s": v, "rounds_per_s": results[k],
                     "vs_none": vs_none if "none" in med else None, "vs_noop": vs_noop if "noop" in med else None,
                     "vs_noop_per_pass": spread, "spool_lag": lags.get(k), "peak_rss_mb": peak.get(k, {}),
                     "hook_us_per_request": {role: statistics.mean(v) for role, v in hook_us.get(k, {}).items()},
                     "cpu_us_per_request": {r: statistics.mean(run.get(r, 0.0) for run in cpu[k])
                                            for r in {r for run in cpu[k] for r in run}}})
    # CPU per request by process (mean over passes): noise-free attribution of the cost.
    roles = sorted({r for runs in cpu.values() for run in runs for r in run if not r.startswith("other")})
    print("\nCPU per request, microseconds (user+system, by process; mean over passes)")
    print(f"{'configuration':14s} " + " ".join(f"{r[:22]:>22s}" for r in roles) + f" {'total':>8s}")
    for k, runs in cpu.items():
        vals = [statistics.mean(run.get(r, 0.0) for run in runs) for r in roles]
        print(f"{k:14s} " + " ".join(f"{v:22.0f}" for v in vals) + f" {sum(vals):8.0f}")
    print("\nPeak RSS, MB (VmHWM, the largest process of each role; shared pages count in each)")
    print(f"{'configuration':14s} " + " ".join(f"{r[:22]:>22s}" for r in roles))
    for k in cpu:
        print(f"{k:14s} " + " ".join(f"{peak.get(k, {}).get(r, 0.0):22.0f}" for r in roles))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
