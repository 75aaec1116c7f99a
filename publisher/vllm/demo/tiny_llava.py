"""Build a tiny LLaVA (random weights, seeded) that real vLLM loads: no hub download needed.

Vision: CLIP, hidden 32, 2 layers, 32x32 images, patch 8 -> 16 patch features per image.
Language: Llama, hidden 128, 2 heads (head_dim 64: CPU paged attention rejects 16), 2 layers.
The encoder output vLLM caches per image is (16, 128): the projector's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGE_SIZE = 32
PATCH = 8
NUM_FEATURES = (IMAGE_SIZE // PATCH) ** 2
HIDDEN = 128
WORDS = ["the", "a", "image", "shows", "cat", "dog", "red", "blue", "green", "what", "is", "in", "this",
         "describe", "picture", "and", "of", "on", "with", "USER:", "ASSISTANT:", "?", ".", ","]


def build(path: str | Path, seed: int = 0, *, vision_hidden: int = 32, vision_layers: int = 2,
          image_size: int = IMAGE_SIZE, patch: int = PATCH, max_positions: int = 512) -> Path:
    """Write the model to ``path`` (skipped if already built there). Returns the path.

    The keywords size the vision tower (heads of 16 up to hidden 32, of 64 beyond; MLP 2x up to 32, 4x
    beyond): benchmarks/reuse.py builds one whose encoder costs something. The defaults are the tiny model."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    if (path / ".complete").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer, vocab = word_tokenizer(specials + WORDS, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", additional_special_tokens=["<image>"])
    vocab_size = 256  # room to spare; tokens past the vocab are never produced by the tokenizer

    small = vision_hidden <= 32
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * (2 if small else 4),
                              num_hidden_layers=vision_layers,
                              num_attention_heads=vision_hidden // 16 if small else max(1, vision_hidden // 64),
                              image_size=image_size, patch_size=patch, projection_dim=vision_hidden)
    text = LlamaConfig(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_positions,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    _rename_vision_keys(path)

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return finish(path, processor, tokenizer, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def word_tokenizer(tokens: list[str], **special):
    """A whitespace word-level tokenizer over ``tokens`` (ids in order, first occurrence wins) -> (tokenizer,
    vocab). ``special``: PreTrainedTokenizerFast's token arguments (unk_token is required)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token=special["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, **special), vocab


def finish(path: Path, processor, tokenizer, **generation) -> Path:
    """Save the processor and tokenizer beside the weights, the generation config, then the marker that
    makes ``build`` skip a finished model."""
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(generation))
    (path / ".complete").write_text("ok\n")
    return path


def _rename_vision_keys(path: Path) -> None:
    """transformers 5 writes ``vision_tower.embeddings.*``; vLLM expects ``vision_tower.vision_model.*``."""
    from safetensors.torch import load_file, save_file

    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        renamed = {}
        for k, v in tensors.items():
            for old in ("vision_tower.embeddings.", "vision_tower.encoder.", "vision_tower.pre_layrnorm.",
                        "vision_tower.post_layernorm."):
                if old in k:
                    k = k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                    break
            renamed[k] = v
        save_file(renamed, f, metadata={"format": "pt"})


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string else '' }}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt(num_images: int, text: str = "what is in this image ?") -> str:
    return "USER: " + "<image> " * num_images + text + " ASSISTANT:"


def random_image(seed: int):
    """A distinct, deterministic 32x32 RGB image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


def reference_image_features(model_dir: str | Path, image) -> "torch.Tensor":
    """The independent reference: the same weights through transformers on the same image -> (16, 128)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    pixel = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    if isinstance(out, (list, tuple)):
        out = out[0]
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out.reshape(-1, out.shape[-1]).float()
