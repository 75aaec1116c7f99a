"""The input parsers under fuzzing: every corpus file replayed (no atheris needed), and a bounded
coverage-guided run per target (atheris, in a subprocess: ``atheris.Fuzz`` exits when done).

Crash files (``corpus/<target>/crash-*``) listed in ``targets.KNOWN_FINDINGS`` xfail strictly:
once the product is fixed they pass, the xfail fails, and the entry comes out of
``KNOWN_FINDINGS``. The bounded runs tolerate those known findings and fail on any other.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import targets

HERE = Path(__file__).resolve().parent
# Inputs per target in CI: each run takes a few seconds on 2 cores (the event-log targets write a file per input).
RUNS = {
    "codec": 100000,
    "codec_registry": 60000,
    "decoder": 100000,
    "objects": 100000,
    "event_log_blocks": 8000,
    "event_log_file": 12000,
    "publisher_config": 60000,
    "consumer_config": 60000,
}
# A fixed libFuzzer seed keeps CI reproducible; VLLM_MM_EVENTS_FUZZ_SEED=0 lets libFuzzer pick one.
SEED = int(os.environ.get("VLLM_MM_EVENTS_FUZZ_SEED", "1"))
HANG_AFTER_S = 3  # replay_in_subprocess: inputs take milliseconds
MAX_SEED_BYTES = 64 << 10
MAX_CORPUS_BYTES = 1 << 20


def corpus_files(target: str) -> list[Path]:
    return sorted(p for p in (targets.CORPUS / target).iterdir() if p.is_file())


def _replay_cases():
    known = targets.known_seeds()
    for target in targets.TARGETS:
        for path in corpus_files(target):
            k = known.get((target, path.name))
            marks = [pytest.mark.xfail(strict=True, raises=targets.Finding, reason=k.reason)] if k else []
            yield pytest.param(target, path, marks=marks, id=f"{target}/{path.name}")


def replay_in_subprocess(target: str, path: Path, data: bytes) -> None:
    """For inputs that hang inside compiled code, which no in-process guard can interrupt: replay
    in a subprocess whose stack faulthandler dumps after HANG_AFTER_S; a dump is a ``Hang`` finding."""
    cmd = [sys.executable, str(HERE / "run.py"), "--target", target, "--replay", str(path),
           "--hang-after", str(HANG_AFTER_S)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          timeout=HANG_AFTER_S + 60)
    if "Timeout (0:" in proc.stdout:  # faulthandler's dump, most recent call first
        frames = re.findall(r'File "(.+?)", line \d+ in (\S+)', proc.stdout.split("Timeout (0:", 1)[1])
        site = next((f"{Path(f).resolve().relative_to(targets.PRODUCT_ROOT).as_posix()}:{fn}" for f, fn in frames
                     if Path(f).resolve().is_relative_to(targets.PRODUCT_ROOT)
                     and Path(f).resolve().relative_to(targets.PRODUCT_ROOT).parts[0] in targets.PRODUCT_DIRS), "?")
        raise targets.Finding(target, "Hang", site, f"still running after {HANG_AFTER_S}s (replayed in a subprocess)",
                              data)
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.parametrize("target,path", list(_replay_cases()))
def test_corpus_replays_without_a_finding(target, path):
    data = path.read_bytes()
    k = targets.known_seeds().get((target, path.name))
    try:
        if k is not None and re.fullmatch(k.kind, "Hang"):
            replay_in_subprocess(target, path, data)
        else:
            targets.TARGETS[target](data)
    except targets.Finding as f:
        if k is not None and not k.matches(f):  # still crashes, but not as listed: say so, not xfail
            pytest.fail(f"{path.name} is listed as {k.kind} at {k.site}, but now: {f}", pytrace=False)
        raise


def test_corpus_is_complete_and_small():
    total = 0
    for target in targets.TARGETS:
        files = corpus_files(target)
        assert any(p.name.startswith("seed-") for p in files), f"no seeds for {target}; run make_corpus.py"
        for p in files:
            size = p.stat().st_size
            assert size < MAX_SEED_BYTES, f"{p} is {size} bytes; keep seeds under {MAX_SEED_BYTES}"
            total += size
    assert total < MAX_CORPUS_BYTES, f"the corpus is {total} bytes; keep it under {MAX_CORPUS_BYTES}"
    assert set(RUNS) == set(targets.TARGETS)


def test_every_known_finding_has_its_crash_files():
    """A crash file stays after its fix (a regression input); a known finding must name files that exist."""
    files = {(t, p.name) for t in targets.TARGETS for p in corpus_files(t)}
    missing = sorted(set(targets.known_seeds()) - files)
    assert not missing, f"targets.KNOWN_FINDINGS names files that are not in the corpus: {missing}"


@pytest.mark.parametrize("target", list(targets.TARGETS))
def test_bounded_fuzz_run_finds_nothing_new(target, tmp_path):
    pytest.importorskip("atheris")
    crashes = tmp_path / "crashes"
    cmd = [sys.executable, str(HERE / "run.py"), "--target", target, "--runs", str(RUNS[target]),
           "--seed", str(SEED), "--crash-dir", str(crashes), "--corpus-out", str(tmp_path / "corpus")]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          timeout=300)
    summary = [line for line in proc.stdout.splitlines() if line.startswith("[fuzz]")]
    print("\n".join(summary))
    found = sorted(p.name for p in crashes.iterdir()) if crashes.exists() else []
    assert proc.returncode == 0 and not found, (
        f"{target}: new finding(s) {found} (exit {proc.returncode}); add the input to corpus/{target}/ as "
        f"crash-<what> and to targets.KNOWN_FINDINGS until fixed.\n{proc.stdout[-8000:]}")
    # libFuzzer may run a few inputs past -runs (its initial corpus pass): at least that many ran.
    ran = re.search(rf"\[fuzz\] {target}: ok: (\d+) inputs", proc.stdout)
    assert ran and int(ran.group(1)) >= RUNS[target], proc.stdout[-4000:]
