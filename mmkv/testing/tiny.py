"""Tiny random vision-language models of every supported family, built from configs (no downloads).

Each build uses the real transformers model and processor classes with a small config (2 text layers,
hidden 64, 4 attention heads over 2 KV heads, a 2-layer vision tower, small images) and a byte-level
BPE tokenizer trained on the spot over a few sentences plus the family's special tokens. Weights are
random but seeded. ``save_tiny`` writes a checkpoint directory that :func:`mmkv.models.load` reads
offline, with the same file layout as a real checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..tiny.tokenizer import SPECIALS as QWEN_SPECIALS

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision", "idefics3", "smolvlm")
VIDEO_FAMILIES = FAMILIES  # every family takes video (natively or as frames)

__all__ = ["FAMILIES", "VIDEO_FAMILIES", "build_tiny", "save_tiny", "make_image", "make_video", "tiny_tokenizer"]

_CORPUS = [
    "the red square moves to the right across the dark frame",
    "a green circle and a blue triangle sit on a black background",
    "what is shown in the image? describe the colours and the shapes",
    "which object moves in the video and where does it go",
    "count the shapes, name their colours, and say what changed between frames",
    "you are a helpful assistant. answer the question in one short sentence.",
    "there are two pictures: compare them and tell me how they differ",
    "the video shows a small white box sliding from left to right over time",
    "seconds minutes frame from a video of 0 1 2 3 4 5 6 7 8 9 series provided following",
    "user assistant system picture image video yes no maybe left right top bottom middle",
]

# ----------------------------------------------------------------------------------------------
# Chat templates, written for these tiny models in the format of each family's published template.
# ----------------------------------------------------------------------------------------------

_QWEN_PARTS = (
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + _QWEN_PARTS + "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}" + _QWEN_PARTS + "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ '\n' + part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_IDEFICS_BODY = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{{ '<end_of_utterance>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "{{ '<|begin_of_text|>' }}" + _IDEFICS_BODY
SMOLVLM_TEMPLATE = "{{ '<|im_start|>' }}" + _IDEFICS_BODY

_ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
_IDEFICS_IMAGE = ("<fake_token_around_image>", "<image>", "<global-img>") + _ROW_COL

# family -> (special tokens, bos, eos, pad, unk, tokenizer adds bos)
_TOKENS: dict[str, tuple[tuple[str, ...], str | None, str, str, str | None, bool]] = {
    "qwen": (QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", None, False),
    "llava": (("<unk>", "<s>", "</s>", "<pad>", "<image>"), "<s>", "</s>", "<pad>", "<unk>", True),
    "llava_onevision": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        None,
        False,
    ),
    "idefics3": (
        ("<|begin_of_text|>", "<|end_of_text|>", "<end_of_utterance>", "<pad>") + _IDEFICS_IMAGE,
        "<|begin_of_text|>",
        "<end_of_utterance>",
        "<pad>",
        None,
        True,
    ),
    "smolvlm": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>") + _IDEFICS_IMAGE,
        "<|im_start|>",
        "<end_of_utterance>",
        "<|endoftext|>",
        None,
        False,
    ),
}


def _token_group(family: str) -> str:
    return "qwen" if family.startswith("qwen") else family


@functools.cache
def _tokenizer_json(group: str) -> str:
    """Train (once per family group) a byte-level BPE over the corpus; return its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, bos, _eos, _pad, _unk, add_bos = _TOKENS[group]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 256 + 200,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if add_bos and bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok.to_str()


def tiny_tokenizer(family: str) -> Any:
    """A fresh ``PreTrainedTokenizerFast`` for ``family`` (the trained vocabulary is cached)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    group = _token_group(family)
    _specials, bos, eos, pad, unk, _ = _TOKENS[group]
    kwargs = {"eos_token": eos, "pad_token": pad}
    if bos is not None:
        kwargs["bos_token"] = bos
    if unk is not None:
        kwargs["unk_token"] = unk
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(group)), **kwargs)
    return tok


def _text_config(tok: Any, model_type: str, **extra: Any) -> dict[str, Any]:
    cfg = {
        "model_type": model_type,
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": False,
    }
    cfg["bos_token_id"] = tok.bos_token_id  # None where the tokenizer has no BOS (Qwen)
    cfg.update(extra)
    return cfg


def _ids(tok: Any, *tokens: str) -> list[int]:
    out = tok.convert_tokens_to_ids(list(tokens))
    if any(i is None or i == tok.unk_token_id and tok.unk_token_id is not None for i in out):
        raise RuntimeError(f"tiny tokenizer lacks one of {tokens}")
    return out


# ----------------------------------------------------------------------------------------------
# Per-family builders: (model, processor)
# ----------------------------------------------------------------------------------------------


def _qwen(family: str, seed: int) -> tuple[Any, Any]:
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..models.base import build_processor

    tok = tiny_tokenizer(family)
    image_id, video_id, start_id, end_id = _ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    common: dict[str, Any] = {
        "image_token_id": image_id,
        "video_token_id": video_id,
        "vision_start_token_id": start_id,
        "vision_end_token_id": end_id,
    }
    config: transformers.PretrainedConfig
    cls: type[transformers.PreTrainedModel]
    processor_cls: type[transformers.ProcessorMixin]
    if family == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config=_text_config(tok, "qwen2_vl_text", rope_parameters=rope),
            vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
            **common,
        )
        cls, processor_cls, patch, template = (
            transformers.Qwen2VLForConditionalGeneration,
            transformers.Qwen2VLProcessor,
            14,
            QWEN2_TEMPLATE,
        )
    elif family == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=_text_config(tok, "qwen2_5_vl_text", rope_parameters=rope),
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
                "window_size": 56,
                "fullatt_block_indexes": [1],
                "tokens_per_second": 2,
            },
            **common,
        )
        cls, processor_cls, patch, template = (
            transformers.Qwen2_5_VLForConditionalGeneration,
            transformers.Qwen2_5_VLProcessor,
            14,
            QWEN2_TEMPLATE,
        )
    else:
        config = transformers.Qwen3VLConfig(
            text_config=_text_config(
                tok, "qwen3_vl_text", head_dim=16, rope_parameters={**rope, "mrope_interleaved": True}
            ),
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
                "num_position_embeddings": 64,
                "deepstack_visual_indexes": [0],
                "patch_size": 16,
            },
            **common,
        )
        cls, processor_cls, patch, template = (
            transformers.Qwen3VLForConditionalGeneration,
            transformers.Qwen3VLProcessor,
            16,
            QWEN3_TEMPLATE,
        )
    factor = patch * 2
    mean_std = {} if patch == 14 else {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=factor * factor * 4,
        max_pixels=factor * factor * 36,
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        **mean_std,
    )
    processor = build_processor(processor_cls, image_processor, tok, template)
    if family == "qwen3_vl":  # Qwen3-VL's budget counts all frames of a video
        size = {"shortest_edge": factor * factor * 4, "longest_edge": factor * factor * 4 * 32}
    else:
        size = {"shortest_edge": factor * factor * 4, "longest_edge": factor * factor * 16}
    processor.video_settings = {
        "size": size,
        "patch_size": patch,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }
    return _instantiate(cls, config, seed), processor


def _llava(seed: int) -> tuple[Any, Any]:
    import transformers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from ..models.base import build_processor

    tok = tiny_tokenizer("llava")
    (image_id,) = _ids(tok, "<image>")
    config = transformers.LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 7,
            "projection_dim": 32,
        },
        text_config=_text_config(tok, "llama"),
        image_token_index=image_id,
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = build_processor(
        transformers.LlavaProcessor,
        image_processor,
        tok,
        LLAVA_TEMPLATE,
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return _instantiate(transformers.LlavaForConditionalGeneration, config, seed), processor


_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28], [56, 84], [84, 56], [84, 84]]


def _onevision(seed: int) -> tuple[Any, Any]:
    import transformers
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..models.base import build_processor

    tok = tiny_tokenizer("llava_onevision")
    image_id, video_id = _ids(tok, "<image>", "<video>")
    config = transformers.LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 7,
        },
        text_config=_text_config(tok, "qwen2"),
        image_token_index=image_id,
        video_token_index=video_id,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28}, image_grid_pinpoints=_PINPOINTS, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = build_processor(
        transformers.LlavaOnevisionProcessor,
        image_processor,
        tok,
        ONEVISION_TEMPLATE,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    processor.video_settings = {"size": {"height": 28, "width": 28}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return _instantiate(transformers.LlavaOnevisionForConditionalGeneration, config, seed), processor


def _idefics(family: str, seed: int) -> tuple[Any, Any]:
    import transformers

    from ..models.base import build_processor

    tok = tiny_tokenizer(family)
    (image_id,) = _ids(tok, "<image>")
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    ip_kwargs = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
    config: transformers.PretrainedConfig
    cls: type[transformers.PreTrainedModel]
    processor_cls: type[transformers.ProcessorMixin]
    image_processor: Any
    if family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        config = transformers.Idefics3Config(
            vision_config=vision, text_config=_text_config(tok, "llama"), image_token_id=image_id, scale_factor=2
        )
        cls, processor_cls, template = (
            transformers.Idefics3ForConditionalGeneration,
            transformers.Idefics3Processor,
            IDEFICS3_TEMPLATE,
        )
        image_processor = Idefics3ImageProcessorPil(**ip_kwargs)
    else:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        config = transformers.SmolVLMConfig(
            vision_config=vision, text_config=_text_config(tok, "llama"), image_token_id=image_id, scale_factor=2
        )
        cls, processor_cls, template = (
            transformers.SmolVLMForConditionalGeneration,
            transformers.SmolVLMProcessor,
            SMOLVLM_TEMPLATE,
        )
        image_processor = SmolVLMImageProcessorPil(**ip_kwargs)
    processor = build_processor(processor_cls, image_processor, tok, template, image_seq_len=4)
    return _instantiate(cls, config, seed), processor


def _instantiate(cls: type, config: Any, seed: int) -> Any:
    from transformers import GenerationConfig

    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model = model.to(torch.float32).eval()
    text = config.get_text_config()
    model.generation_config = GenerationConfig(
        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, bos_token_id=getattr(text, "bos_token_id", None)
    )
    return model


_BUILDERS: dict[str, Callable[[int], tuple[Any, Any]]] = {
    "qwen2_vl": lambda seed: _qwen("qwen2_vl", seed),
    "qwen2_5_vl": lambda seed: _qwen("qwen2_5_vl", seed),
    "qwen3_vl": lambda seed: _qwen("qwen3_vl", seed),
    "llava": _llava,
    "llava_onevision": _onevision,
    "idefics3": lambda seed: _idefics("idefics3", seed),
    "smolvlm": lambda seed: _idefics("smolvlm", seed),
}


def build_tiny(family: str, seed: int = 0) -> tuple[Any, Any]:
    """A fresh tiny ``(model, processor)`` of ``family`` (one of :data:`FAMILIES`): fp32, eval, sdpa.

    Every call returns new objects (callers may change them); weights depend only on ``seed``.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    return _BUILDERS[family](seed)


def save_tiny(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny checkpoint (model, processor, video settings) that ``mmkv.models.load(path)`` reads."""
    from ..models.base import VIDEO_CONFIG_FILE

    model, processor = build_tiny(family, seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    settings = getattr(processor, "video_settings", None)
    if settings:
        (path / VIDEO_CONFIG_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Media helpers
# ----------------------------------------------------------------------------------------------

_COLOURS = [(230, 60, 50), (60, 200, 90), (70, 110, 240), (240, 210, 60), (200, 80, 220), (240, 240, 240)]


def make_image(seed: int = 0, size: int | tuple[int, int] = (64, 48)) -> Image.Image:
    """A ``size=(width, height)`` (or square ``size``) RGB image of a few coloured shapes on a dark background."""
    rng = random.Random(seed)
    w, h = (size, size) if isinstance(size, int) else size
    img = Image.new("RGB", (w, h), (rng.randint(0, 30), rng.randint(0, 30), rng.randint(10, 40)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randint(0, w * 3 // 4), rng.randint(0, h * 3 // 4)
        x1, y1 = (
            min(w - 1, x0 + rng.randint(w // 8 + 1, w // 2 + 2)),
            min(h - 1, y0 + rng.randint(h // 8 + 1, h // 2 + 2)),
        )
        colour = rng.choice(_COLOURS)
        shape = rng.choice(("rect", "ellipse", "triangle"))
        if shape == "rect":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif shape == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    return img


def make_video(path: str | os.PathLike, num_frames: int = 8, size: tuple[int, int] = (64, 64), fps: float = 4) -> Path:
    """Write an mp4 (``mp4v``) of a white square moving left to right on a dark background."""
    import cv2
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} with the mp4v codec")
    side = max(4, min(w, h) // 4)
    try:
        for i in range(num_frames):
            frame = np.full((h, w, 3), 20, dtype=np.uint8)
            x = int((w - side) * i / max(1, num_frames - 1))
            y = (h - side) // 2
            frame[y : y + side, x : x + side] = (255, 255, 255)
            frame[: h // 8, : w // 8] = (0, 0, 255)  # a fixed red corner (BGR)
            writer.write(frame)
    finally:
        writer.release()
    return path
