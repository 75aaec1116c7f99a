"""vllm-mm-events consumers: follow the event stream, index the embeddings into vector stores.

Torch-free and vLLM-free (enforced by import-linter and by a CI step in a venv without them).
Rooms: ``sources`` (where events come from), ``sinks`` (vector stores), ``decoder``,
``objects`` and ``vectors`` (event -> verified array -> point), ``errors`` (poison vs
transient), ``dead_letters``, ``indexer`` (the loop), ``metrics``, ``config``, ``cli``.
"""
