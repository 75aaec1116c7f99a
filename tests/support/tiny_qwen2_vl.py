"""Build a tiny Qwen2-VL (random weights, seeded) that real vLLM loads: no hub download needed.

Vision: embed_dim 64, 2 heads, depth 2, patch 14, spatial_merge 2, temporal_patch 2.
Language: Qwen2, hidden 128, 2 heads (head_dim 64: CPU paged attention rejects 16), 2 layers, M-RoPE.
The encoder output vLLM caches per item is (num_tokens, 128): the patch merger's output, with
num_tokens = grid_t * grid_h * grid_w / 4. The processor does not resize images whose sides are
multiples of 28 (min_pixels 28*28, max_pixels 112*112), so:

- a 56x56 image -> grid (1, 4, 4) -> 4 features; a 112x56 (w x h) image -> grid (1, 4, 8) -> 8 features;
- a 4-frame 56x56 video -> grid (2, 4, 4) -> 8 features (frames pair up: temporal_patch_size 2).

A video is a uint8 numpy array (frames, height, width, 3); vLLM's offline ``LLM.generate`` takes it
as ``multi_modal_data={"video": array}`` (Qwen2-VL needs no video metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from publisher.vllm.demo.tiny_llava import finish, word_tokenizer

if TYPE_CHECKING:
    import numpy as np
    import torch

PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2
FACTOR = PATCH * MERGE  # 28: image sides that are multiples of it are kept as they are
MIN_PIXELS = FACTOR * FACTOR
MAX_PIXELS = 4 * FACTOR * 4 * FACTOR  # 112 x 112
HIDDEN = 128
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
WORDS = ["the", "a", "image", "video", "shows", "cat", "dog", "red", "blue", "green", "what", "is", "in", "this",
         "describe", "picture", "and", "of", "on", "with", "user", "assistant", "system", "?", ".", ","]


def num_features(width: int, height: int, frames: int = 1) -> int:
    """Encoder features for an image (frames=1) or a video whose sides are multiples of 28 within the pixel range."""
    t = -(-frames // TEMPORAL_PATCH)  # frames pair up; an odd count is padded
    return t * (height // PATCH) * (width // PATCH) // (MERGE * MERGE)


def build(path: str | Path, seed: int = 0) -> Path:
    """Write the model to ``path`` (skipped if already built there). Returns the path."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    if (path / ".complete").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)

    tokenizer, vocab = word_tokenizer(SPECIALS + WORDS, unk_token="<unk>", eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[2:])
    vocab_size = 256  # room to spare; tokens past the vocab are never produced by the tokenizer

    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=HIDDEN, mlp_ratio=2, num_heads=2, in_channels=3,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH),
        text_config=dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"],
                         # head_dim 64 -> 32 rotary frequencies, split over (t, h, w)
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [8, 12, 12]}),
        image_token_id=vocab[IMAGE_PAD], video_token_id=vocab[VIDEO_PAD],
        vision_start_token_id=vocab[VISION_START], vision_end_token_id=vocab[VISION_END],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common = dict(size=size, patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**common),
                                 video_processor=Qwen2VLVideoProcessor(**common),
                                 tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return finish(path, processor, tokenizer, bos_token_id=vocab["<|endoftext|>"],
                  eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"])


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}" + IMAGE_PLACEHOLDER + " "
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}" + VIDEO_PLACEHOLDER + " "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def prompt(num_images: int = 0, num_videos: int = 0, text: str = "describe this") -> str:
    """A raw prompt: one placeholder per item, images first, then videos (vLLM expands each pad token)."""
    media = [IMAGE_PLACEHOLDER] * num_images + [VIDEO_PLACEHOLDER] * num_videos
    return "<|im_start|> user " + " ".join(media + [text]) + " <|im_end|> <|im_start|> assistant "


def image_prompt(num_images: int = 1, text: str = "what is in this image ?") -> str:
    return prompt(num_images=num_images, text=text)


def video_prompt(num_videos: int = 1, text: str = "describe this video .") -> str:
    return prompt(num_videos=num_videos, text=text)


def random_image(seed: int, width: int = 56, height: int = 56):
    """A distinct, deterministic RGB PIL image (keep sides multiples of 28 to avoid resizing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_video(seed: int, frames: int = 4, width: int = 56, height: int = 56) -> "np.ndarray":
    """A distinct, deterministic video: uint8 array (frames, height, width, 3); frames should be even."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def _load(model_dir: str | Path):
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(Path(model_dir), dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(Path(model_dir))


def _first(out) -> "torch.Tensor":
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out.reshape(-1, out.shape[-1]).float()


def reference_image_features(model_dir: str | Path, image) -> "torch.Tensor":
    """The independent reference: the same weights through transformers on the same image -> (n, 128)."""
    import torch

    model, processor = _load(model_dir)
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    return _first(out)


def reference_video_features(model_dir: str | Path, video) -> "torch.Tensor":
    """The same for a video (frames, height, width, 3) uint8 -> (n, 128)."""
    import torch

    model, processor = _load(model_dir)
    inputs = processor.video_processor(videos=[video], return_tensors="pt")
    with torch.no_grad():
        out = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                       video_grid_thw=inputs["video_grid_thw"])
    return _first(out)
