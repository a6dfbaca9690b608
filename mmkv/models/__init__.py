"""Model-family adapters and loading.

``ADAPTERS`` maps ``config.model_type`` to the adapter that renders chats for that family, builds its
image/video inputs and the :class:`~mmkv.inputs.modality.ModalityMap` of every prompt.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..bundled import resolve_model_name
from .base import (
    Chat,
    ModelAdapter,
    PreparedInputs,
    UnsupportedModelError,
    VideoFrames,
    VisualBounds,
    as_chat,
    bounds_of,
)
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .llava import LlavaAdapter, LlavaOnevisionAdapter
from .qwen_vl import Qwen2VLAdapter, Qwen3VLAdapter, Qwen25VLAdapter
from .text import TextLMAdapter, is_text_lm

TEXT_ADAPTER = TextLMAdapter()

__all__ = [
    "ADAPTERS",
    "Chat",
    "ModelAdapter",
    "PreparedInputs",
    "UnsupportedModelError",
    "VideoFrames",
    "VisualBounds",
    "adapter_for",
    "as_chat",
    "bound_visual_tokens",
    "bounds_of",
    "load",
    "supported_families",
]

_ADAPTER_CLASSES: tuple[type[ModelAdapter], ...] = (
    Qwen2VLAdapter,
    Qwen25VLAdapter,
    Qwen3VLAdapter,
    LlavaAdapter,
    LlavaOnevisionAdapter,
    Idefics3Adapter,
    SmolVLMAdapter,
)

ADAPTERS: dict[str, ModelAdapter] = {}
for _cls in _ADAPTER_CLASSES:
    _adapter = _cls()
    for _model_type in _cls.model_types:
        ADAPTERS[_model_type] = _adapter

_FAMILY_NAMES = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "llava": "LLaVA-1.5",
    "llava_onevision": "LLaVA-OneVision",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
}


def supported_families() -> str:
    """Human-readable list of supported families with their ``model_type``."""
    return ", ".join(f"{_FAMILY_NAMES.get(t, t)} ({t})" for t in ADAPTERS) + ", and any causal text LM (text prompts)"


def adapter_for(model_or_config: Any) -> ModelAdapter:
    """The adapter for a model, a config, or a ``model_type`` string."""
    if isinstance(model_or_config, str):
        model_type: str | None = model_or_config
        what = model_type
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        what = f"{type(model_or_config).__name__} (model_type={model_type!r})"
    adapter = ADAPTERS.get(model_type) if model_type else None
    if adapter is None and not isinstance(model_or_config, str):
        config = getattr(model_or_config, "config", model_or_config)
        if is_text_lm(config):
            return TEXT_ADAPTER
    if adapter is None:
        raise UnsupportedModelError(
            f"mmkv has no adapter for {what}. Supported families: {supported_families()}. "
            "Load one of these vision-language models, or a decoder-only text LM."
        )
    return adapter


def bound_visual_tokens(
    model: torch.nn.Module, processor: Any, image_tokens: int | None = None, video_tokens: int | None = None
) -> str:
    """Cap the visual tokens per image and per video (frames x tokens per frame) that ``prepare`` makes
    with this loaded ``(model, processor)``; ``None`` or 0 leaves that kind to the processor's own limits.

    Each family uses what its processor offers (see the adapters' ``bound_visual_tokens``): Qwen-VL lowers
    ``max_pixels`` (images) and the per-frame pixels of a video; Idefics3/SmolVLM lower the tile grid;
    LLaVA-OneVision downscales a lone image; fixed-size families (LLaVA-1.5 images, every family's video
    frames once at their smallest) keep fewer frames. Bounds never raise the processor's own limits.
    Returns one line describing the effect. Text LMs: nothing to bound.
    """
    adapter = adapter_for(model)
    if adapter is TEXT_ADAPTER:
        return "text only"
    return adapter.bound_visual_tokens(model, processor, image_tokens, video_tokens)


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16', 'float32' or a torch.dtype")


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: Any = None,
    attn_implementation: str = "sdpa",
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, processor)`` of a supported family from a checkpoint directory or hub id.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` defaults to the checkpoint's own
    (``"auto"``). The processor is loaded without a video processor (mmkv builds video inputs itself),
    so this works without torchvision. The model is returned in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    source = resolve_model_name(name_or_path)
    local = os.path.exists(source)
    if local and not os.path.isfile(os.path.join(source, "config.json")):
        raise ValueError(
            f"{source!r} is not a model checkpoint directory (no config.json); check the path. "
            f"Supported families: {supported_families()}."
        )
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        hint = (
            "check the path"
            if local
            else "check the path, or the hub id and that this machine can reach the Hugging Face hub "
            "(hub ids need it; a local checkpoint directory does not)"
        )
        raise ValueError(
            f"cannot load a model config from {source!r}: {str(exc).strip().rstrip('.')}. {hint}. "
            f"Supported families: {supported_families()}."
        ) from exc
    adapter = adapter_for(config)
    resolved = _resolve_dtype(dtype)
    kwargs: dict[str, Any] = {
        "attn_implementation": attn_implementation,
        "dtype": "auto" if resolved is None else resolved,
    }
    try:
        auto = AutoModelForCausalLM if adapter is TEXT_ADAPTER else AutoModelForImageTextToText
        model = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot load the {config.model_type} model weights from {source!r}: {str(exc).strip().rstrip('.')}. "
            "Check that the directory "
            "holds the weights (model.safetensors) or that the hub is reachable."
        ) from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' decorated to() misreads its arguments
    try:
        processor = adapter.load_processor(source)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot load the processor (tokenizer, image processor) from {source!r}: {str(exc).strip().rstrip('.')}. "
            "Check that the "
            "checkpoint ships tokenizer and preprocessor files."
        ) from exc
    return model, processor
