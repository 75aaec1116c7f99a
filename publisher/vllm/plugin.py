"""The ``vllm.general_plugins`` entry point: makes ``ec_connector="MMEmbeddingPublisher"`` resolvable.

vLLM calls this in every process it starts (API server, engine core, workers), possibly
more than once per process, so it must be idempotent and cheap.
"""

from publisher.logs import setup_logging

CONNECTOR_MODULE = "publisher.vllm.connector"
CONNECTOR_CLASS = "MMEmbeddingPublisher"


def register() -> None:
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory

    setup_logging()
    if CONNECTOR_CLASS not in ECConnectorFactory._registry:
        ECConnectorFactory.register_connector(CONNECTOR_CLASS, CONNECTOR_MODULE, CONNECTOR_CLASS)
