"""The one logging setup for every process of the product (engine side, sidecars, consumers).

Everything logs under the ``vllm_mm_events`` logger to stderr; the level comes from
``VLLM_MM_EVENTS_LOG_LEVEL`` (INFO). Formats: ``engine`` (shaped like vLLM's own lines, for
the processes vLLM starts), ``text`` and ``json`` (one object per line, for log pipelines).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LOGGER = "vllm_mm_events"
FORMATS = ("engine", "text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str = "engine", *, replace: bool = False) -> None:
    """Attach our handler once (vLLM may load us several times per process); ``replace`` re-formats."""
    log = logging.getLogger(LOGGER)
    if log.handlers and not replace:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif fmt == "engine":
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [mm-events pid=%(process)d] %(message)s",
                                               "%m-%d %H:%M:%S"))
    else:
        raise ValueError(f"log format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    log.handlers[:] = [handler]
    log.setLevel(os.environ.get("VLLM_MM_EVENTS_LOG_LEVEL", "INFO").upper())
    log.propagate = False
