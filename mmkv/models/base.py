"""The adapter contract: one adapter per model family turns a chat into model inputs and a ModalityMap.

A *chat* is a list of messages in the transformers format::

    [{"role": "user", "content": [
        {"type": "image", "image": PIL.Image | "path.png"},
        {"type": "video", "video": "clip.mp4" | [PIL.Image, ...]},
        {"type": "text", "text": "What moves?"}]}]

A plain string is accepted as one user text turn.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from ..inputs.modality import ModalityMap
from ..inputs.video import VideoFrames, as_video_frames, load_image

if TYPE_CHECKING:
    from transformers import ProcessorMixin

Chat = list[dict[str, Any]]


class UnsupportedModelError(ValueError):
    """The model class has no mmkv adapter."""


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

    @abstractmethod
    def modality_map(self, model: torch.nn.Module, inputs: dict[str, Any], **kwargs: Any) -> ModalityMap:
        """Per-token provenance built from the *encoded* inputs only (token ids / ``mm_token_type_ids`` and
        the grid information the processor returned), never from assumed token counts.

        Adapters that feed video frames as images accept ``sources=[(modality, source, frame), ...]`` (one
        entry per image input, in order); Idefics3/SmolVLM use ``processor=`` to name tiles from their
        marker tokens. ``inputs`` may also be the kwargs of a forward call made by ``generate()``, which
        in transformers >= 5.23 carry ``mm_encoder_outputs`` instead of pixels and grids: adapters then
        reuse the map :meth:`prepare` made for the same token ids, else rebuild it as well as they can.
        """

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The language decoder (the module with ``.layers`` whose attention we compress)."""
        return resolve_text_model(model)

    # ------------------------------------------------------------------ continuing a kept cache
    def media_suffix(self, prepared: PreparedInputs, images: int, videos: int) -> dict[str, Any]:
        """The pixel inputs of the last ``images`` images and ``videos`` videos of ``prepared`` (a whole
        conversation), for a forward that feeds only the new turn's tokens against a kept cache.

        Families whose model numbers or packs a new turn's visual tokens by the whole prompt (LLaVA-OneVision
        switches to base-view-only features with several images; Idefics3/SmolVLM feed tiles as one batch)
        raise; a text-only turn needs nothing from here (docs/methods.md, "Multi-turn").
        """
        if not images and not videos:
            return {}
        raise ValueError(
            f"the {self.family} family cannot attach new images or videos to a kept cache in a later turn: "
            "attach them in the first turn, ask with reread=True (the whole conversation is read again), "
            "or start a new Conversation"
        )

    def suffix_position_ids(self, model: torch.nn.Module, prepared: PreparedInputs, start: int) -> torch.Tensor | None:
        """Position ids of tokens ``start:`` of ``prepared`` as a full read numbers them, and the model's
        rope state set for the decode steps after them; None where positions are the token indices."""
        return None

    # ------------------------------------------------------------------ visual token bounds
    def bound_visual_tokens(
        self, model: torch.nn.Module, processor: Any, image_tokens: int | None, video_tokens: int | None
    ) -> str:
        """Cap the visual tokens one image / one video may produce with this ``processor`` (see
        :class:`VisualBounds`); returns one line saying what the bound does for this family.

        The default stores the bounds on the processor, where :meth:`prepare` finds them; families whose
        processors have their own resolution settings also lower those (never raise them)."""
        set_bounds(processor, image_tokens, video_tokens)
        return (
            "no visual inputs" if processor is None else "bounds stored (no resolution setting known for this family)"
        )

    def frame_cap(self, model: torch.nn.Module, processor: Any) -> int | None:
        """Most frames one video may keep under the processor's video bound (None: no cap)."""
        return None


@dataclass(frozen=True)
class VisualBounds:
    """Most visual tokens one image (``image_tokens``) / one video (``video_tokens``: frames x tokens per
    frame) may produce; ``None`` = the processor's own limits. Set with :func:`mmkv.models.bound_visual_tokens`
    (the app does it at load time); ``prepare`` lowers the resolution first, then the frame count."""

    image_tokens: int | None = None
    video_tokens: int | None = None


def set_bounds(processor: Any, image_tokens: int | None, video_tokens: int | None) -> VisualBounds:
    bounds = VisualBounds(
        None if not image_tokens or image_tokens <= 0 else int(image_tokens),
        None if not video_tokens or video_tokens <= 0 else int(video_tokens),
    )
    if processor is not None:
        processor.mmkv_bounds = bounds
    return bounds


def bounds_of(processor: Any) -> VisualBounds:
    """The bounds set on ``processor`` (none by default: library users get the processor's own limits)."""
    return getattr(processor, "mmkv_bounds", None) or VisualBounds()


def frames_for_budget(video_tokens: int | None, tokens_per_frame: int) -> int | None:
    """Frames of ``tokens_per_frame`` tokens that fit in ``video_tokens`` (at least 1; None = no cap)."""
    if video_tokens is None or tokens_per_frame <= 0:
        return None
    return max(1, int(video_tokens) // int(tokens_per_frame))


def cap_frames(video: VideoFrames, cap: int | None) -> VideoFrames:
    """Keep at most ``cap`` frames of a sampled video, evenly spread (first and last kept)."""
    n = len(video.frames)
    if cap is None or n <= cap:
        return video
    if cap == 1:
        keep = [n // 2]
    else:
        keep = sorted({round(i * (n - 1) / (cap - 1)) for i in range(cap)})
    span = video.timestamps[keep[-1]] - video.timestamps[keep[0]] if len(keep) > 1 else 0.0
    fps = (len(keep) - 1) / span if span > 0 else video.fps
    return VideoFrames(
        [video.frames[i] for i in keep], [video.timestamps[i] for i in keep], fps=fps, duration=video.duration
    )


def bounded_frames(num_frames: int | None, video_fps: float | None, cap: int | None) -> int | None:
    """``num_frames`` lowered to ``cap`` (only when frames are counted, not sampled by rate)."""
    if cap is None or num_frames is None or video_fps is not None:
        return num_frames
    return min(int(num_frames), cap)


def resolve_text_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model.model.language_model`` -> ``model.model.text_model`` -> ``get_decoder()``."""
    inner = getattr(model, "model", model)
    for name in ("language_model", "text_model"):
        tower = getattr(inner, name, None)
        if tower is not None and hasattr(tower, "layers"):
            return tower
    if hasattr(inner, "layers"):
        return inner
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
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


# ----------------------------------------------------------------------------------------------
# Helpers shared by the adapters (prompt rendering, the question boundary, offline processors).
# ----------------------------------------------------------------------------------------------


def common_prefix_length(a: Any, b: Any) -> int:
    """Number of leading positions where two id sequences (lists or 1-D/[1, L] tensors) agree."""
    a = _flat_ids(a)
    b = _flat_ids(b)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _flat_ids(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    if ids and isinstance(ids[0], (list, tuple)):
        return list(ids[0])
    return list(ids)


def question_probe(chat: Chat) -> Chat:
    """The chat with the *question* changed, to locate where it starts.

    The question is the last user message's final text part: it is replaced by an empty string. If
    that message has no (non-empty) text, a text part ``"?"`` is appended instead, so the boundary
    falls right after the message's images/videos.
    """
    probe = [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in chat]
    users = [i for i, m in enumerate(probe) if m["role"] == "user"]
    if not users:
        return probe
    content = probe[users[-1]]["content"]
    texts = [j for j, p in enumerate(content) if p["type"] == "text"]
    if texts and content[texts[-1]].get("text", "").strip():
        content[texts[-1]]["text"] = ""
    else:
        content.append({"type": "text", "text": "?"})
    return probe


def context_length_of(encode: Any, chat: Chat, input_ids: Any) -> int:
    """Tokens before the question: common prefix of ``input_ids`` and ``encode(question_probe(chat))``.

    ``encode`` maps a chat to its token ids exactly the way the prompt was encoded (same template,
    same placeholder expansion), so the prefix ends where the question's first token starts.
    """
    return common_prefix_length(input_ids, encode(question_probe(chat)))


def render_chat(processor: Any, chat: Chat) -> str:
    """The processor's chat template applied to one conversation, with the generation prompt.

    Calls :meth:`ProcessorMixin.apply_chat_template` directly: some processors (SmolVLM) override it
    and consult their video processor, which does not exist without torchvision.
    """
    from transformers.processing_utils import ProcessorMixin

    if (
        getattr(processor, "chat_template", None) is None
        and getattr(processor.tokenizer, "chat_template", None) is None
    ):
        raise ValueError("the processor has no chat template; load a checkpoint that ships one (chat_template.jinja)")
    template = processor.chat_template if processor.chat_template is not None else processor.tokenizer.chat_template
    return ProcessorMixin.apply_chat_template(
        processor, chat, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def expand_placeholders(text: str, replacements: dict[str, list[str]]) -> str:
    """Replace the i-th occurrence of each placeholder token with ``replacements[token][i]``."""
    import re

    tokens = [t for t, r in replacements.items() if r is not None]
    if not tokens:
        return text
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    counters = dict.fromkeys(tokens, 0)

    def sub(m: re.Match[str]) -> str:
        token = m.group(0)
        i = counters[token]
        counters[token] += 1
        if i >= len(replacements[token]):
            raise ValueError(f"the prompt has more {token} placeholders than inputs of that kind")
        return replacements[token][i]

    out = pattern.sub(sub, text)
    for token in tokens:
        if counters[token] != len(replacements[token]):
            raise ValueError(
                f"the chat template produced {counters[token]} {token} placeholders for {len(replacements[token])} inputs"
            )
    return out


def encode_text(processor: Any, text: str) -> list[int]:
    """Tokenize a rendered prompt like the processor does (no second BOS when the template has one)."""
    tok = processor.tokenizer
    add_special = not (tok.bos_token is not None and text.startswith(tok.bos_token))
    return list(tok(text, add_special_tokens=add_special)["input_ids"])


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def to_model(inputs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Move tensors to the model's device; pixel tensors also to its dtype."""
    device, dtype = model_device_dtype(model)
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype) if k in PIXEL_KEYS else v.to(device)
        out[k] = v
    return out


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of ``True`` in a 1-D bool tensor."""
    m = mask.to(torch.int8).reshape(-1)
    if m.numel() == 0:
        return []
    d = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
    starts = (d == 1).nonzero().reshape(-1).tolist()
    ends = (d == -1).nonzero().reshape(-1).tolist()
    return list(zip(starts, ends))


_NO_VIDEO: dict[type, type] = {}


def processor_class_without_video(cls: type[ProcessorMixin]) -> type:
    """A subclass of a transformers processor class that needs no video processor.

    transformers' video processors require torchvision. The subclass drops ``video_processor`` from the
    processor's sub-processor list (so construction, ``save_pretrained`` and ``from_pretrained`` skip it);
    it keeps the original class name so saved configs still name the real processor class. Videos are
    turned into model inputs by mmkv's adapters instead.
    """
    if cls in _NO_VIDEO:
        return _NO_VIDEO[cls]
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]

    def get_attributes(klass: type) -> list[str]:
        return list(attributes)

    sub = type(cls.__name__, (cls,), {"get_attributes": classmethod(get_attributes), "__module__": cls.__module__})
    sub.__qualname__ = cls.__qualname__
    sub.__doc__ = f"{cls.__name__} without a video processor (mmkv builds video inputs itself)."
    _NO_VIDEO[cls] = sub
    return sub


VIDEO_CONFIG_FILE = "video_preprocessor_config.json"


def build_processor(cls: type, image_processor: Any, tokenizer: Any, chat_template: str | None, **kwargs: Any) -> Any:
    """Instantiate ``cls`` (a transformers processor class) without a video processor."""
    import inspect

    sub = processor_class_without_video(cls)
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]  # the class's own constructor
    call = {
        k: v for k, v in kwargs.items() if k in params and k not in ("image_processor", "tokenizer", "video_processor")
    }
    if "video_processor" in params:
        call["video_processor"] = None
    proc = sub(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **call)
    proc.video_settings = {}
    return proc


_PIL_MODULES = {  # image processor type -> transformers module holding its PIL variant
    "Qwen2VLImageProcessor": "qwen2_vl",
    "CLIPImageProcessor": "clip",
    "SiglipImageProcessor": "siglip",
    "LlavaImageProcessor": "llava",
    "LlavaOnevisionImageProcessor": "llava_onevision",
    "Idefics3ImageProcessor": "idefics3",
    "SmolVLMImageProcessor": "smolvlm",
}


def _pil_image_processor(name_or_path: str, **kwargs: Any) -> Any:
    """Load the PIL variant of a checkpoint's image processor (no torchvision needed)."""
    import importlib

    from transformers.image_processing_utils import ImageProcessingMixin

    config, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path, **kwargs)
    base = str(config.get("image_processor_type") or "").removesuffix("Fast").removesuffix("Pil")
    module = _PIL_MODULES.get(base)
    if module is None:
        raise ImportError(f"no PIL image processor known for {base or 'this checkpoint'}; install torchvision")
    mod = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
    return getattr(mod, base + "Pil").from_pretrained(name_or_path, **kwargs)


def load_processor_without_video(cls: type[ProcessorMixin], name_or_path: str, **kwargs: Any) -> Any:
    """Load a processor of class ``cls`` from a checkpoint directory or hub id, offline-safe.

    Reads the tokenizer, the image processor (``preprocessor_config.json`` or the nested entry of
    ``processor_config.json``), the processor's own settings and chat template; skips the video
    processor. Video settings (``video_preprocessor_config.json``, when present) land in
    ``processor.video_settings`` as a plain dict.
    """
    import json
    import os

    from transformers import AutoImageProcessor, AutoTokenizer

    name_or_path = str(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    try:
        image_processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    except ImportError:  # transformers < 5.23 without torchvision: the auto class itself is unavailable
        image_processor = _pil_image_processor(name_or_path, **kwargs)
    try:
        processor_dict, _ = cls.get_processor_dict(name_or_path, **kwargs)
    except (OSError, ValueError):
        processor_dict = {}
    chat_template = processor_dict.pop("chat_template", None) or getattr(tokenizer, "chat_template", None)
    skip = ("image_processor", "tokenizer", "video_processor", "chat_template", "processor_class", "auto_map")
    settings = {k: v for k, v in processor_dict.items() if k not in skip}
    proc = build_processor(cls, image_processor, tokenizer, chat_template, **settings)
    video_settings: dict[str, Any] = {}
    try:
        if os.path.isdir(name_or_path):
            local = os.path.join(name_or_path, VIDEO_CONFIG_FILE)
            path: str | None = local if os.path.isfile(local) else None
        else:
            from transformers.utils import cached_file

            path = cached_file(name_or_path, VIDEO_CONFIG_FILE, _raise_exceptions_for_missing_entries=False, **kwargs)
        if path:
            with open(path, encoding="utf-8") as f:
                video_settings = json.load(f)
    except (OSError, ValueError):
        video_settings = {}
    proc.video_settings = video_settings
    return proc


def collect_media(
    chat: Chat, num_frames: int | None = None, video_fps: float | None = None
) -> tuple[list[Image.Image], list[VideoFrames]]:
    """Images (RGB) and sampled videos of a chat, each in chat order.

    ``num_frames``/``video_fps`` as in :func:`mmkv.inputs.video.as_video_frames`; with neither, 8 frames.
    """

    if num_frames is None and video_fps is None:
        num_frames = 8
    images: list[Image.Image] = []
    videos: list[VideoFrames] = []
    for message in chat:
        for part in message["content"]:
            if part["type"] == "image":
                value = part.get("image", part.get("path", part.get("url")))
                if value is None:
                    raise ValueError("an image part needs an 'image' key (a file path or PIL.Image)")
                images.append(load_image(value))
            elif part["type"] == "video":
                value = part.get("video", part.get("path", part.get("url")))
                if value is None:
                    raise ValueError("a video part needs a 'video' key (a file path or a list of frames)")
                videos.append(as_video_frames(value, num_frames=num_frames, fps=video_fps))
    return images, videos


# ----------------------------------------------------------------------------------------------
# Maps of recently prepared prompts. transformers >= 5.23's generate() runs the vision encoder
# itself and calls forward with ``mm_encoder_outputs`` instead of pixels and grids, so a map
# rebuilt from a forward call's kwargs may lack grid information; the map made by ``prepare`` for
# the same token ids is then the exact answer.
# ----------------------------------------------------------------------------------------------

_RECENT: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, int], ModalityMap]] = weakref.WeakKeyDictionary()
_RECENT_MAX = 16


def _ids_key(input_ids: Any) -> tuple[int, int]:
    ids = _flat_ids(input_ids)
    return len(ids), hash(tuple(ids))


def remember_map(model: torch.nn.Module, input_ids: Any, modality: ModalityMap) -> None:
    """Keep the map of a prepared prompt so a later forward of the same ids can reuse it."""
    store = _RECENT.setdefault(model, {})
    key = _ids_key(input_ids)
    store.pop(key, None)
    store[key] = modality
    while len(store) > _RECENT_MAX:
        store.pop(next(iter(store)))


def recall_map(model: torch.nn.Module, input_ids: Any) -> ModalityMap | None:
    """The map :func:`remember_map` stored for exactly these token ids on this model, if any."""
    store = _RECENT.get(model)
    return None if store is None else store.get(_ids_key(input_ids))


def encoder_counts(output: Any) -> list[int] | None:
    """Tokens per image/video in a vision-encoder output passed as ``mm_encoder_outputs[kind]``."""
    if output is None:
        return None
    pooled = output.get("pooler_output") if hasattr(output, "get") else getattr(output, "pooler_output", None)
    if isinstance(pooled, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in pooled):
        return [int(t.shape[0]) if t.dim() == 2 else int(t.shape[-2]) for t in pooled]
    if isinstance(pooled, torch.Tensor) and pooled.dim() == 3:
        return [int(pooled.shape[1])] * int(pooled.shape[0])
    return None
