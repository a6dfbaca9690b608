"""The adapter contract: one adapter per model family turns a chat into model inputs and a ModalityMap.

A *chat* is a list of messages in the transformers format::

    [{"role": "user", "content": [
        {"type": "image", "image": PIL.Image | "path.png"},
        {"type": "video", "video": "clip.mp4" | [PIL.Image, ...]},
        {"type": "text", "text": "What moves?"}]}]

A plain string is accepted as one user text turn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from ..modality import ModalityMap

Chat = list[dict[str, Any]]


class UnsupportedModelError(ValueError):
    """The model class has no mmkv adapter."""


@dataclass
class VideoFrames:
    """Frames sampled from one video, with their timestamps in seconds."""

    frames: list[Image.Image]
    timestamps: list[float]
    fps: float  # sampling rate of the returned frames (frames per second of video time)


@dataclass
class PreparedInputs:
    """Everything the driver needs for one prompt.

    - ``inputs``: keyword arguments for the model's forward (``input_ids``, ``pixel_values``, ...),
      batch size 1, on the model's device.
    - ``modality``: provenance of each of the ``L`` prompt tokens.
    - ``context_length``: number of leading tokens that form the *context* (images/video and text
      before the final question). Compression in query-agnostic mode covers only these tokens.
    - ``images`` / ``videos``: the pixels as given (images) or sampled (video frames), in chat
      order, for overlays.
    """

    inputs: dict[str, Any]
    modality: ModalityMap
    context_length: int
    images: list[Image.Image] = field(default_factory=list)
    videos: list[VideoFrames] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


class ModelAdapter(ABC):
    """Per-family glue. Subclasses set ``family`` and ``model_types`` (``config.model_type`` values)."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    @abstractmethod
    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        """Load the processor (offline-safe: works without torchvision)."""

    @abstractmethod
    def prepare(
        self,
        model: torch.nn.Module,
        processor: Any,
        chat: Chat | str,
        *,
        num_frames: int | None = None,
        video_fps: float | None = None,
    ) -> PreparedInputs:
        """Render the chat with the processor's template, encode it, and build the ModalityMap."""

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The language decoder (the module with ``.layers`` whose attention we compress)."""
        return resolve_text_model(model)


def resolve_text_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model.model.language_model`` -> ``model.model.text_model`` -> ``get_decoder()``."""
    inner = getattr(model, "model", model)
    for name in ("language_model", "text_model"):
        tower = getattr(inner, name, None)
        if tower is not None and hasattr(tower, "layers"):
            return tower
    if hasattr(inner, "layers"):
        return inner
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and hasattr(decoder, "layers"):
        return decoder
    raise UnsupportedModelError(
        f"Cannot find the language decoder of {type(model).__name__}; mmkv supports "
        "Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, LLaVA-OneVision and SmolVLM/Idefics3."
    )


def as_chat(chat: Chat | str) -> Chat:
    """Normalise a string or a chat; check the structure and give a fixable error otherwise."""
    if isinstance(chat, str):
        chat = [{"role": "user", "content": [{"type": "text", "text": chat}]}]
    if not isinstance(chat, list) or not chat:
        raise ValueError("chat must be a non-empty list of {'role', 'content'} messages or a string")
    out: Chat = []
    for message in chat:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"each chat message needs 'role' and 'content' keys, got {message!r}")
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for part in content:
            if part.get("type") not in ("text", "image", "video"):
                raise ValueError(f"unsupported content part {part.get('type')!r}: use 'text', 'image' or 'video'")
        out.append({"role": message["role"], "content": list(content)})
    if not any(p["type"] == "text" and p["text"].strip() for m in out for p in m["content"]) and not any(
        p["type"] != "text" for m in out for p in m["content"]
    ):
        raise ValueError("the prompt is empty: write a question or attach an image or video")
    return out
