"""Start vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with the publisher."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from services import free_port


class OpenAIServer:
    def __init__(self, model: Path, extra_config: dict, workdir: Path, env: dict | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        ec = {"ec_connector": "MMEmbeddingPublisher", "ec_role": "ec_both", "ec_connector_extra_config": extra_config}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", "tiny-llava", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
               "--limit-mm-per-prompt", json.dumps({"image": 4}), "--ec-transfer-config", json.dumps(ec),
               # Give in-flight work (and the publisher's flush) time on SIGTERM; 0 would abort.
               "--shutdown-timeout", "30", *extra_args]
        full_env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> "OpenAIServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready:\n{self.log()[-5000:]}")

    def chat(self, content: list, **extra) -> requests.Response:
        body = {"model": "tiny-llava", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                "temperature": 0, **extra}
        return requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> str:
        """SIGTERM to the server process alone, as Kubernetes does; returns the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left behind
        except ProcessLookupError:
            pass
        self.proc.wait()
        return self.log()


def image_part(img) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def image_embeds_part(tensor) -> dict:
    import torch

    buf = io.BytesIO()
    torch.save(tensor, buf)
    return {"type": "image_embeds", "image_embeds": base64.b64encode(buf.getvalue()).decode()}
