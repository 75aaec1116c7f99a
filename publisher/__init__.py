"""vllm-mm-events publisher: multimodal encoder outputs from vLLM to an object store, events to Kafka.

Only light imports here: vLLM loads this package in every process through its plugin
entry point, and ``load_mm_embeddings`` must work without vLLM installed.
"""

__version__ = "0.1.0"

from publisher.client import EmbeddingNotAvailable, load_mm_embeddings  # noqa: E402

__all__ = ["__version__", "load_mm_embeddings", "EmbeddingNotAvailable"]
