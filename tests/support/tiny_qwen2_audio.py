"""Build a tiny Qwen2-Audio (random weights, seeded) that real vLLM loads: no hub download needed.

Audio: Qwen2-Audio (Whisper-style) encoder, d_model 64, 2 layers, 2 heads, 128 mel bins; the
log-mel input is always padded to 3000 frames (30 s, what both vLLM and transformers require).
A clip of ``s`` seconds at 16 kHz has ``100 * s`` valid frames and gives
``((frames - 1) // 2 + 1 - 2) // 2 + 1`` features: 1.0 s -> 25, 2.0 s -> 50.
Language: Qwen2, hidden 128, 2 heads (head_dim 64: CPU paged attention rejects 16), 2 layers.
The encoder output vLLM caches per audio is (num_features, 128): the projector's output, cut to
the clip's real length.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from publisher.vllm.demo.tiny_llava import finish, word_tokenizer

if TYPE_CHECKING:
    import numpy as np
    import torch

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
AUDIO_D_MODEL = 64
HIDDEN = 128
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS]
WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "assistant.", "Audio", "1:", "2:", "3:",
         "4:", "what", "is", "in", "this", "audio", "sound", "?", ".", ",", "the", "and", "of", "describe",
         "it", "clip", "a", "dog", "cat", "speech", "music", "noise"]


def num_features(seconds: float, sr: int = SAMPLE_RATE) -> int:
    """Encoder features for a clip of ``seconds`` (at most 30 s: longer clips are truncated)."""
    frames = min(int(round(seconds * sr)), 30 * sr) // 160
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def build(path: str | Path, seed: int = 0) -> Path:
    """Write the model to ``path`` (skipped if already built there). Returns the path."""
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    path = Path(path)
    if (path / ".complete").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)

    tokenizer, vocab = word_tokenizer(SPECIALS + WORDS, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:])
    vocab_size = 256  # room to spare; tokens past the vocab are never produced by the tokenizer

    audio = Qwen2AudioEncoderConfig(num_mel_bins=NUM_MEL_BINS, encoder_layers=2, encoder_attention_heads=2,
                                    encoder_ffn_dim=128, d_model=AUDIO_D_MODEL, max_source_positions=1500)
    text = Qwen2Config(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
                       bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                       pad_token_id=vocab["<|endoftext|>"], tie_word_embeddings=False)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=vocab[AUDIO_TOKEN])
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    _rename_keys(path)

    feature_extractor = WhisperFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=SAMPLE_RATE,
                                                hop_length=160, chunk_length=30, n_fft=400,
                                                return_attention_mask=True)
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE)
    return finish(path, processor, tokenizer, bos_token_id=vocab["<|endoftext|>"],
                  eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"])


def _rename_keys(path: Path) -> None:
    """vLLM 0.32 (no weight mapper for this model) expects the original checkpoint layout:
    ``audio_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``.
    transformers 5.19's reverse key mapping writes the text model as ``language_model.model.model.*`` (one
    ``model.`` too many); the in-memory names (``model.audio_tower.*``, ``model.language_model.*``,
    ``lm_head.*``) are handled too, in case a later version writes those."""
    from safetensors.torch import load_file, save_file

    rules = (("language_model.model.model.", "language_model.model."),
             ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
             ("model.audio_tower.", "audio_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))
    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        renamed = {}
        for k, v in tensors.items():
            for old, new in rules:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            renamed[k] = v.contiguous()
        save_file(renamed, f, metadata={"format": "pt"})


# Qwen2-Audio's own template, with OpenAI-style parts: vLLM turns an ``input_audio`` / ``audio_url``
# part into {"type": "audio"} before rendering, and this emits one placeholder per audio part.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] in ('audio', 'audio_url', 'input_audio') or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt(num_audios: int, text: str = "what is in this audio ?") -> str:
    """One ``<|audio_bos|><|AUDIO|><|audio_eos|>`` per audio: vLLM expands each ``<|AUDIO|>``."""
    audios = "".join(f"Audio {i + 1}: {AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}\n" for i in range(num_audios))
    return f"<|im_start|>user\n{audios}{text}<|im_end|>\n<|im_start|>assistant\n"


def random_audio(seed: int, seconds: float, sr: int = SAMPLE_RATE) -> "tuple[np.ndarray, int]":
    """A distinct, deterministic mono clip: (float32 array in [-0.5, 0.5], sample rate), the tuple
    ``LLM.generate(multi_modal_data={"audio": [...]})`` accepts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
    return (tone + 0.2 * rng.uniform(-1, 1, n)).astype(np.float32), sr


def processed_audio(model_dir: str | Path, audio) -> dict:
    """The processor saved with the model, run as vLLM runs it -> input_features (1, 128, 3000),
    feature_attention_mask (1, 3000)."""
    from transformers import AutoProcessor

    array, sr = audio if isinstance(audio, tuple) else (audio, SAMPLE_RATE)
    processor = AutoProcessor.from_pretrained(Path(model_dir))
    out = processor(text=[prompt(1)], audio=[array], sampling_rate=sr, truncation=True, return_tensors="pt")
    return {"input_features": out["input_features"], "feature_attention_mask": out["feature_attention_mask"]}


def reference_audio_features(model_dir: str | Path, audio) -> "torch.Tensor":
    """The independent reference: the same weights through transformers on the same processed input ->
    (num_features, 128) float32, cut to the clip's real length (as vLLM's embed_multimodal does)."""
    import torch
    from transformers import Qwen2AudioForConditionalGeneration
    from transformers.masking_utils import create_bidirectional_mask

    model_dir = Path(model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    inner = getattr(model, "model", model)
    tower, projector = inner.audio_tower, inner.multi_modal_projector
    inputs = processed_audio(model_dir, audio)
    features, mask = inputs["input_features"].float(), inputs["feature_attention_mask"]
    with torch.no_grad():
        # as Qwen2AudioModel.forward does it: mask the padded frames after the conv stem
        feat_lengths, out_lengths = tower._get_feat_extract_output_lengths(mask.sum(-1))
        max_seq_len = (features.shape[-1] - 2) // 2 + 1
        mask_2d = (torch.arange(max_seq_len)[None, :] < feat_lengths[:, None]).long()
        attn = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(1, max_seq_len, 1),
                                         attention_mask=mask_2d)
        hidden = tower(features, attention_mask=attn).last_hidden_state
        out = projector(hidden)[0, : int(out_lengths[0])]
    return out.float()
