"""vllm-mm-events publisher: multimodal encoder outputs from vLLM to an object store, events to Kafka.

Rooms, top down (``README.md``, "Layout"): ``vllm`` (the hook, the only code that imports
vLLM) and ``loader`` (``load_mm_embeddings``); ``sidecar`` (the runtime beside vLLM's
processes); ``stores`` and ``event_sinks`` (backends); ``config``, ``settings``, ``logs``.

Only light imports here: vLLM loads this package in every process through its plugin
entry point, and ``load_mm_embeddings`` must work without vLLM installed.
"""

from publisher.loader import EmbeddingNotAvailable, load_mm_embeddings  # noqa: E402
from publisher.version import __version__  # noqa: E402

__all__ = ["__version__", "load_mm_embeddings", "EmbeddingNotAvailable"]
