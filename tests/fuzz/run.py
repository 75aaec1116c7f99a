"""Coverage-guided fuzzing of the input parsers with atheris (libFuzzer).

    python tests/fuzz/run.py                                  # every target, 2000 inputs each
    python tests/fuzz/run.py --target codec --runs 100000
    python tests/fuzz/run.py --target objects --seconds 3600  # a long run
    python tests/fuzz/run.py --target objects -- -max_len=65536 -dict=my.dict   # more libFuzzer flags
    python tests/fuzz/run.py --target objects --replay tests/fuzz/crashes/objects-crash-*   # no atheris

Each target runs in its own subprocess (``atheris.Fuzz`` exits the process when it is done),
starting from its checked-in seeds (``corpus/<target>/``, read only). Inputs libFuzzer finds
interesting go to ``--corpus-out`` (default: a temporary directory, deleted afterwards);
crashing inputs go to ``--crash-dir`` (default ``tests/fuzz/crashes/``) as
``<target>-crash-<sha1>`` (``-timeout-``/``-oom-`` for hangs and memory).

Findings already listed in ``targets.KNOWN_FINDINGS`` are tolerated (reported once, then
counted), so a run goes on looking for new ones; ``--strict`` makes them crashes again.
Exit status: 0 when every target finished without a new finding.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CRASH_DIR = HERE / "crashes"


def _worker(args: argparse.Namespace, libfuzzer_args: list[str]) -> None:
    import atheris

    sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
    if args.pure_avro:  # fastavro falls back to its pure-Python modules, which atheris can instrument
        for mod in ("_read", "_write", "_schema", "_logical_readers", "_logical_writers", "_validation"):
            sys.modules[f"fastavro.{mod}"] = None  # type: ignore[assignment]
    with atheris.instrument_imports(include=["schemas", "consumers", "publisher", "fastavro"]):
        import targets

    fn = targets.TARGETS[args.worker]
    hits: dict[str, int] = {}

    def test_one_input(data: bytes) -> None:
        try:
            fn(data)
        except targets.Finding as f:
            k = None if args.strict else targets.known(f)
            if k is None:
                raise
            n = hits[k.seeds[0]] = hits.get(k.seeds[0], 0) + 1
            if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: say so, without flooding the log
                print(f"#known {args.worker}: {f.kind} at {f.site} (like corpus/{k.target}/{k.seeds[0]}) seen {n}x",
                      file=sys.stderr, flush=True)

    argv = [sys.argv[0], *libfuzzer_args]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def _seed_dir(name: str, args: argparse.Namespace, scratch: Path) -> Path:
    """corpus/<target>/, less the known hangs unless --strict: they hang inside compiled code, where
    only libFuzzer's -timeout stops them, and that ends the run."""
    import targets

    seeds = HERE / "corpus" / name
    hangs = {seed for (t, seed), k in targets.known_seeds().items() if t == name and re.fullmatch(k.kind, "Hang")}
    if args.strict or not hangs:
        return seeds
    d = scratch / "seeds"
    d.mkdir()
    for p in seeds.iterdir():
        if p.is_file() and p.name not in hangs:
            shutil.copyfile(p, d / p.name)
    return d


def _run_target(name: str, args: argparse.Namespace, extra: list[str], corpus_out: Path) -> tuple[int, str]:
    out = corpus_out / name
    out.mkdir(parents=True, exist_ok=True)
    crash_dir = Path(args.crash_dir)
    crash_dir.mkdir(parents=True, exist_ok=True)
    flags = [f"-artifact_prefix={crash_dir}/{name}-", f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}",
             "-print_final_stats=1"]
    if args.runs is not None:
        flags.append(f"-runs={args.runs}")
    if args.seconds is not None:
        flags.append(f"-max_total_time={args.seconds}")
    if args.seed is not None:
        flags.append(f"-seed={args.seed}")
    dictionary = HERE / "dicts" / f"{name}.dict"
    if dictionary.exists() and not any(a.startswith("-dict=") for a in extra):
        flags.append(f"-dict={dictionary}")
    # The first corpus directory is where libFuzzer writes new inputs: keep the seeds read-only.
    opts = [o for o, on in (("--strict", args.strict), ("--pure-avro", args.pure_avro)) if on]
    t0 = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=400)  # printed when the run fails
    known: set[str] = set()
    n = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-scratch-") as scratch:
        seeds = _seed_dir(name, args, Path(scratch))
        cmd = [sys.executable, __file__, "--worker", name, *opts, "--", *flags, *extra, str(out), str(seeds)]
        env = {**os.environ, "VLLM_MM_EVENTS_FUZZ_SCRATCH": scratch}
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                              env=env) as proc:
            for line in proc.stdout:
                tail.append(line)
                if args.verbose:
                    sys.stdout.write(line)
                if m := re.match(r"#known \S+ (.*) seen", line):
                    known.add(m.group(1))
                elif m := re.match(r"stat::number_of_executed_units: (\d+)", line):
                    n = int(m.group(1))
                elif (m := re.match(r"Done (\d+) runs", line)) and not n:
                    n = int(m.group(1))
    wall = time.monotonic() - t0
    log = "".join(tail)
    if proc.returncode and not args.verbose:
        sys.stdout.write(log)
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    line = f"[fuzz] {name}: {status}: {n} inputs in {wall:.1f}s ({n / wall:.0f}/s incl. startup)"
    if known:
        line += "; known findings hit: " + "; ".join(sorted(known))
    print(line, flush=True)
    return proc.returncode, log


def _replay(name: str, files: list[str], hang_after: float) -> int:
    """Each file through the target, in this process; exit status 1 if any gives a finding.

    With ``hang_after``, an input still running after that many seconds gets the Python stack
    dumped (faulthandler, which works even inside compiled code) and the process ends (exit 1).
    """
    import faulthandler
    import traceback

    import targets

    findings = 0
    for file in files:
        if hang_after:
            print(f"[replay] {file}: running (a stack dump follows if it is still running after {hang_after}s)",
                  flush=True)
            faulthandler.dump_traceback_later(hang_after, exit=True)
        try:
            targets.TARGETS[name](Path(file).read_bytes())
        except targets.Finding as f:
            findings += 1
            k = targets.known(f)
            print(f"[replay] {file}: {'known' if k else 'NEW'} finding")
            traceback.print_exception(f.__cause__ or f, file=sys.stdout)
            print(f, flush=True)
        else:
            print(f"[replay] {file}: ok")
        finally:
            faulthandler.cancel_dump_traceback_later()
    return 1 if findings else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", action="append", help="a target (repeatable); default: all of them")
    p.add_argument("--runs", type=int, help="inputs per target (libFuzzer -runs); default 2000 unless --seconds")
    p.add_argument("--seconds", type=int, help="time per target (libFuzzer -max_total_time)")
    p.add_argument("--seed", type=int, help="libFuzzer -seed, for a reproducible run (default: random)")
    p.add_argument("--strict", action="store_true", help="treat targets.KNOWN_FINDINGS as crashes too")
    p.add_argument("--pure-avro", action="store_true",
                   help="fastavro's pure-Python reader instead of its compiled one: coverage inside Avro decoding "
                        "(slower; the product runs the compiled one)")
    p.add_argument("--crash-dir", default=str(DEFAULT_CRASH_DIR), help="where crashing inputs are written")
    p.add_argument("--corpus-out", help="keep the inputs libFuzzer finds here (default: a temporary directory)")
    p.add_argument("--timeout", type=int, default=30, help="libFuzzer -timeout: seconds one input may take")
    p.add_argument("--rss-limit-mb", type=int, default=2048, help="libFuzzer -rss_limit_mb")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="stream libFuzzer's output (else only its tail, and only when a target fails)")
    p.add_argument("--replay", nargs="+", metavar="FILE",
                   help="run these inputs through the target (without atheris) and print what they raise")
    p.add_argument("--hang-after", type=float, default=0, metavar="S",
                   help="--replay: dump the stack and exit 1 when an input runs longer than S seconds")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        _worker(args, extra)
        return 0  # not reached: atheris.Fuzz exits

    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(HERE.parent.parent))
    from targets import TARGETS

    names = args.target or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if args.replay:
        if len(names) != 1:
            p.error("--replay needs exactly one --target")
        return _replay(names[0], args.replay, args.hang_after)
    if args.runs is None and args.seconds is None:
        args.runs = 2000
    failed = []
    with tempfile.TemporaryDirectory(prefix="fuzz-corpus-") as tmp:
        corpus_out = Path(args.corpus_out) if args.corpus_out else Path(tmp)
        for name in names:
            rc, _ = _run_target(name, args, extra, corpus_out)
            if rc:
                failed.append(name)
    if failed:
        print(f"[fuzz] findings in {', '.join(failed)}; inputs in {args.crash_dir}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
