"""The vLLM hook: the only code that imports vLLM.

- ``connector``: ``MMEmbeddingPublisher``, the encoder-cache connector (both halves);
- ``capture``: the worker's device-to-host copy into the shared ring;
- ``plugin``: the ``vllm.general_plugins`` entry point that registers the connector;
- ``demo``: the tiny-model demo on the embedded defaults.
"""
