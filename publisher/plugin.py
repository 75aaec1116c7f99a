"""The ``vllm.general_plugins`` entry point: makes ``ec_connector="MMEmbeddingPublisher"`` resolvable.

vLLM calls this in every process it starts (API server, engine core, workers), possibly
more than once per process, so it must be idempotent and cheap.
"""

import logging
import os
import sys

CONNECTOR_MODULE = "publisher.connector"
CONNECTOR_CLASS = "MMEmbeddingPublisher"


def setup_logging() -> None:
    """Our own logger, shaped like vLLM's lines; level from VLLM_MM_EVENTS_LOG_LEVEL (INFO)."""
    log = logging.getLogger("vllm_mm_events")
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [mm-events pid=%(process)d] %(message)s",
                                           "%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(os.environ.get("VLLM_MM_EVENTS_LOG_LEVEL", "INFO").upper())
    log.propagate = False


def register() -> None:
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory

    setup_logging()
    if CONNECTOR_CLASS not in ECConnectorFactory._registry:
        ECConnectorFactory.register_connector(CONNECTOR_CLASS, CONNECTOR_MODULE, CONNECTOR_CLASS)
