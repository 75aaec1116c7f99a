"""The publisher's connector with a clock on every hook vLLM calls: its time on vLLM's loops.

Used by ``publisher_throughput.py`` (``ec_connector_module_path``). Each engine process adds up
the wall and CPU time spent inside the hooks, by hook, and writes it at shutdown as JSON to
``$MM_EVENTS_HOOK_TIMES/<role>-<pid>.json``. This is the cost the engine pays on its own
threads (the scheduler loop; the model step); the sidecars' work is not in it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from publisher.vllm.connector import MMEmbeddingPublisher

HOOKS = ("has_cache_item", "ensure_cache_available", "update_state_after_alloc", "build_connector_meta",
         "take_unavailable_requests", "request_finished", "start_load_caches", "start_save_caches", "save_caches",
         "get_finished")


def _timed(name: str, fn):
    def hook(self, *args, **kwargs):
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(self, *args, **kwargs)
        finally:
            t = self._hook_times.setdefault(name, [0, 0.0, 0.0])
            t[0] += 1
            t[1] += time.perf_counter() - w0
            t[2] += time.thread_time() - c0
    return hook


class TimedPublisher(MMEmbeddingPublisher):
    def __init__(self, vllm_config, role):
        self._hook_times: dict[str, list] = {}
        super().__init__(vllm_config, role)

    def shutdown(self) -> None:
        out = os.environ.get("MM_EVENTS_HOOK_TIMES")
        if out:
            role = self.role.name.lower()
            Path(out, f"{role}-{os.getpid()}.json").write_text(json.dumps(
                {"role": role, "hooks": {k: {"calls": v[0], "wall_s": v[1], "cpu_s": v[2]}
                                         for k, v in self._hook_times.items()}}))
        super().shutdown()


for _name in HOOKS:
    setattr(TimedPublisher, _name, _timed(_name, getattr(MMEmbeddingPublisher, _name)))
