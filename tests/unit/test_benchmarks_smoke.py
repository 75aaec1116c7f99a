"""The benchmarks still run: each one's ``--quick`` mode on tiny sizes. A benchmark is not a test,
so nothing here looks at a figure; it only proves the script completes and prints its tables."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_publisher_bytes_quick(minio):
    env = dict(os.environ, **minio.env)
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "publisher_bytes.py"), "--quick",
                        "--endpoint", minio.endpoint],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "| object" in out and "sidecar->S3" in out and "files+fsync" in out
    for kind in ("16x128 bfloat16", "32x256 float32"):
        assert f"| {kind}" in out, out
    assert "storage_dtype for a bfloat16 encoder" in out and "copies of each byte" in out
