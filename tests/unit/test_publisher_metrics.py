"""The publisher's metrics across a container restart.

The sidecars' metric files live in one directory on the pod's ``/tmp`` (an emptyDir: it outlives
a container restart), while the restarted container numbers its processes from 1 again. Each
"container" here is a real PID namespace (``unshare``), and in each a process starts the way a
scheduler sidecar starts its metrics (``process._metrics(config, serve=True)``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from publisher_checks import scrape

from services import free_port

NS = "vllm_mm_events_publisher_"

# argv: in_flight, spool_bytes, published. Prints its pid, then serves /metrics until stdin closes
# (the first one "is killed" by closing it: it exits without any cleanup, as after a SIGKILL).
SIDECAR = textwrap.dedent("""
    import json, os, sys
    from publisher.config import PublisherConfig
    from publisher.sidecar.process import _metrics

    config = json.loads(os.environ["MM_CONFIG"])
    m = _metrics(PublisherConfig.from_dict(config), serve=True)
    in_flight, spool_bytes, published = map(int, sys.argv[1:])
    m.in_flight.set(in_flight)
    m.spool_bytes.set(spool_bytes)
    m.inc("published", published)
    print(os.getpid(), flush=True)
    sys.stdin.read()
    os._exit(0)
""")


def start_in_new_container(tmp_path, config: dict, *values: int, under_shell: bool = False
                           ) -> tuple[subprocess.Popen, int]:
    """The process in a new PID namespace, its /tmp the shared directory; and its pid there. Alone it is
    pid 1; ``under_shell``, a shell is (an entrypoint, as vLLM's API server is in the chart) and it is 2."""
    unshare = shutil.which("unshare")
    assert unshare, "util-linux's unshare is needed (it makes the PID namespaces)"
    shell = ["/bin/sh", "-c", '"$@"; exit $?', "sh"] if under_shell else []  # not exec'd: sh stays pid 1
    proc = subprocess.Popen(
        [unshare, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
         *shell, sys.executable, "-c", SIDECAR, *map(str, values)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "MM_CONFIG": json.dumps(config),
             "PYTHONPATH": ":".join(p for p in sys.path if p)})
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"the sidecar did not start: {line!r}, rc={proc.poll()}"
    return proc, int(line)


def stop(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("pid_now_held_by", ["the new sidecar", "another process"])
def test_a_restarted_container_reusing_a_dead_sidecars_pid_does_not_inherit_its_metrics(tmp_path, pid_now_held_by):
    config = {"metrics_port": free_port(), "metrics_host": "127.0.0.1"}
    first, first_pid = start_in_new_container(tmp_path, config, 500, 4096, 7)
    try:
        m = scrape(config)
        assert (m[NS + "events_in_flight"], m[NS + "spool_bytes"], m[NS + "events_published_total"]) == (500, 4096, 7)
    finally:
        stop(first)  # killed with 500 events in flight: its files stay in the directory

    elsewhere = pid_now_held_by == "another process"
    second, second_pid = start_in_new_container(tmp_path, config, 2, 0, 1, under_shell=elsewhere)
    try:
        assert (first_pid, second_pid) == ((1, 2) if elsewhere else (1, 1))
        m = scrape(config)
        # Only the live sidecar's values. Named by pid alone, the dead one's file was kept (its pid is
        # running) and summed: 502 in flight, 4096 spool bytes for good; or read back by the new sidecar
        # at its pid, which counted on from it: 8 published.
        assert (m[NS + "events_in_flight"], m[NS + "spool_bytes"], m[NS + "events_published_total"]) == (2, 0, 1)
    finally:
        stop(second)
