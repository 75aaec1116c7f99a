"""The README's first command, as a new user runs it: the installed ``vllm-mm-events-demo`` on the embedded
defaults (real vLLM on the tiny model, local objects and event log, LanceDB, no server), then the consumer's
commands with no flags on what it left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
BIN = Path(sys.executable).parent


def run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_demo_shows_the_whole_pipeline_and_the_cli_works_on_what_it_left(tmp_path):
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), VLLM_MM_EVENTS_METRICS_PORT="0")
    env.pop("VLLM_MM_EVENTS_CONFIG_FILE", None)
    p = run([str(BIN / "vllm-mm-events-demo"), "--workdir", str(tmp_path / "cache")], env)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    out = p.stdout
    print(out)
    data = tmp_path / "data" / "vllm-mm-events"
    # Readable: a short summary; vLLM's own log is in the file the demo names.
    assert len(out.splitlines()) < 45 and "INFO" not in out, out
    log = data / "demo-vllm.log"
    assert f"vLLM log -> {log}" in out and "mm-events worker side stopped" in log.read_text()

    # Step 2: three events (the text-only request has none), nothing missing.
    published = out.split("2. Published")[1].split("3. Indexed")[0]
    rows = [ln.split() for ln in published.splitlines()[3:] if ln.strip()]
    assert [r[1] for r in rows] == ["0", "1", "2"] and [r[-1] for r in rows] == ["0", "0", "0"], published
    # Step 3: every event indexed, one point per image.
    assert re.search(r"^\s+3\s+4\s+0\s+3\s*$", out, re.M), out
    # Step 4: alice's and carol's requests carried the same image: both found first, with score 1.0.
    hits = out.split("4. Search by image")[1].splitlines()[3:6]
    assert [h.split()[1] for h in hits[:2]] == ["1.0000", "1.0000"], hits
    assert {json.loads(h.split(None, 3)[3])["user"] for h in hits[:2]} == {"alice", "carol"}, hits
    assert float(hits[2].split()[1]) < 0.99

    # What a user does next, with no flags: read the events, search again, consume again (nothing new).
    p = run([str(BIN / "vllm-mm-events"), "events", "--format", "json"], env)
    assert p.returncode == 0, p.stderr
    events = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert sorted(e["metadata"]["user"] for e in events) == ["alice", "bob", "carol"]
    like = re.search(r"search --like (\S+)", out).group(1)
    assert like.startswith((data / "objects").as_uri())
    p = run([str(BIN / "vllm-mm-events"), "search", "--like", like, "-k", "2", "--json"], env)
    assert p.returncode == 0, p.stderr
    assert {json.loads(ln)["metadata"]["user"] for ln in p.stdout.splitlines()} == {"alice", "carol"}
    p = run([str(BIN / "vllm-mm-events"), "consume", "--once"], env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["consumed"] == 0  # the demo's group already has everything
