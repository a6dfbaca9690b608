"""The teaching model: a real ``Qwen2VLForConditionalGeneration`` (1.27M parameters) and its processor.

Sizes follow the probe in ``research/tiny_vlm_probe.md``: text hidden 128 x 4 layers, 4 heads over 2 KV
heads, MLP 512; vision tower 64 wide x 2 blocks, patch 14, 2 x 2 merge, temporal patch 2. Images are
kept at 112 x 112 px (16 visual tokens); larger ones are shrunk to that pixel budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mmkv.tiny.tasks import IMAGE_SIZE
from mmkv.tiny.tokenizer import CHAT_TEMPLATE, build_tokenizer

__all__ = ["MIN_PIXELS", "MAX_PIXELS", "build_config", "build_processor", "build_model", "save"]

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE
MIN_PIXELS = FACTOR * FACTOR * 4  # 56 x 56
MAX_PIXELS = IMAGE_SIZE * IMAGE_SIZE  # 112 x 112 -> 16 merged tokens


def build_config(tokenizer: Any, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None) -> Any:
    """The v1 config; ``text`` / ``vision`` override entries of the text / vision config (v2: ``training.tiny.grow``)."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    text_config = {
        "model_type": "qwen2_vl_text",
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
        **(text or {}),
    }
    vision_config = {
        "depth": 2,
        "embed_dim": 64,
        "hidden_size": 128,
        "num_heads": 4,
        "mlp_ratio": 4,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "in_channels": 3,
        **(vision or {}),
    }
    return transformers.Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[0],
        video_token_id=ids[1],
        vision_start_token_id=ids[2],
        vision_end_token_id=ids[3],
        tie_word_embeddings=False,
    )


def video_settings(image_processor: Any, max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    return {
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels},
        "patch_size": PATCH,
        "merge_size": MERGE,
        "temporal_patch_size": 2,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }


def build_processor(tokenizer: Any | None = None, max_pixels: int = MAX_PIXELS) -> Any:
    """A ``Qwen2VLProcessor`` (PIL image processor, no video processor: mmkv builds video inputs).

    ``max_pixels``: the image pixel budget (v1 112 x 112; v2 196 x 196, ``training.tiny.grow.V2_MAX_PIXELS``).
    """
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmkv.models.base import build_processor as _build

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    ip = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=max_pixels, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2
    )
    processor = _build(transformers.Qwen2VLProcessor, ip, tokenizer, CHAT_TEMPLATE)
    processor.video_settings = video_settings(ip, max_pixels)
    return processor


def build_model(tokenizer: Any, seed: int = 0, config: Any = None) -> Any:
    """A freshly initialised fp32 model (sdpa attention), seeded (``config``: default the v1 config)."""
    import transformers

    config = config if config is not None else build_config(tokenizer)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2VLForConditionalGeneration(config)
    model.generation_config = generation_config(tokenizer)
    return model.float()


def generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16
    )


def save(model: Any, processor: Any, path: str | os.PathLike) -> Path:
    """Write weights, config, generation config, tokenizer, processor and video settings to ``path``."""
    from mmkv.models.base import VIDEO_CONFIG_FILE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config(processor.tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / VIDEO_CONFIG_FILE).write_text(json.dumps(processor.video_settings, indent=2) + "\n", encoding="utf-8")
    return path
