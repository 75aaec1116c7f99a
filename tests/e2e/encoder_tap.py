"""A test connector: the publisher, plus a copy of every encoder output exactly as vLLM handed it over.

Loaded through ``ec_connector_module_path="encoder_tap"`` (next to ``engine_driver.py``); each
``save_caches`` also writes ``$ENCODER_TAP_DIR/<mm_hash>.pt`` (the tensor, its dtype kept), so a
test can compare the stored object with what the encoder produced, bit for bit.
"""

import os
from pathlib import Path

import torch

from publisher.vllm import connector


class MMEmbeddingPublisher(connector.MMEmbeddingPublisher):
    def save_caches(self, encoder_cache, mm_hash, **kwargs):
        tap = os.environ.get("ENCODER_TAP_DIR")
        if tap and connector._tp_rank() == 0:
            Path(tap).mkdir(parents=True, exist_ok=True)
            torch.save(encoder_cache[mm_hash].detach().cpu().clone(), Path(tap) / f"{mm_hash}.pt")
        return super().save_caches(encoder_cache, mm_hash, **kwargs)
