"""How big a prepared prompt is, and whether the device can hold it (no Gradio here).

:func:`prompt_preview` counts the prompt's tokens (text / image / video), the KV cache the full prompt
needs, and compares prompt + answer with three limits: the model's context, ``MMKV_MAX_PROMPT_TOKENS``
and the memory the device has left. :func:`check_capacity` raises a :class:`UserError` saying how to
shrink the prompt when one of them is exceeded.

Memory estimate (rough, on purpose an over- rather than an under-estimate), for ``L`` prompt tokens and
``N`` new tokens, with the text decoder's hidden size ``d``, MLP size ``f``, ``h`` query heads,
``k`` KV heads of size ``e`` and ``n`` layers, ``b`` bytes per value in the model's dtype:

- KV cache: ``(L + N) x n x k x e x 2 x b`` (keys and values of every layer, as the Full run keeps);
- prefill activations, one layer at a time (transformers frees each layer's temporaries):
  ``L x (4d + 2ke + 3f) x b`` (hidden states and residual, q/k/v/o projections, gate/up/act of the MLP;
  sdpa attention itself is memory-efficient);
- mmkv's attention statistics: two fp32 score blocks of ``h x rows x L``, at most 256 MiB each
  (:mod:`mmkv.statistics.stats`), so ``min(2 x h x L x L x 4, 512 MiB)``;
- the vision tower: per visual token, ``merge^2`` patches (4 for Qwen-VL) of width ``d_v`` through
  ``4 d_v + 3 f_v`` values, ``visual_tokens x 4 x (4 d_v + 3 f_v) x b``.

The device holds: on CUDA, ``torch.cuda.mem_get_info`` free memory plus what torch's allocator keeps
reserved but unused; on CPU, ``MemAvailable`` (psutil when installed, else ``/proc/meminfo``), capped by
the container's cgroup limit. A safety margin of 10 % of it plus 256 MiB is kept back. When the free
memory cannot be read (macOS without psutil, a ZeroGPU process outside its GPU slot), only the context
and ``MMKV_MAX_PROMPT_TOKENS`` are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from .config import HostingSettings
from .errors import UserError

__all__ = ["PromptSize", "check_capacity", "device_free_bytes", "kv_bytes_per_token", "prompt_preview"]

STATS_CAP = 512 * 1024**2  # two 256 MiB fp32 score blocks (mmkv.statistics.stats)
MARGIN_BYTES = 256 * 1024**2
MARGIN_SHARE = 0.10


@dataclass
class PromptSize:
    """Token counts of one prepared prompt and the verdict of the capacity check."""

    tokens: int  # whole prompt
    text: int
    image: int  # image tokens
    video: int  # video tokens
    images: int  # number of images
    videos: int  # number of videos
    max_new_tokens: int
    kv_bytes: int  # KV cache of the full prompt
    need_bytes: int  # KV of prompt + answer, plus the activation estimate
    free_bytes: int | None  # what the device can hold now (None: unknown)
    device: str
    limit: int | None  # most prompt tokens allowed (tightest of the limits), None: no limit known
    fits: bool
    reason: str = ""  # what is exceeded (empty when it fits)
    advice: str = ""  # how to shrink (empty when it fits)

    def message(self) -> str:
        """The refusal: what is too big, then how to shrink it (empty when it fits)."""
        return "" if self.fits else f"{self.reason} {self.advice}"

    def summary(self) -> str:
        """One line for the page, e.g. ``Prompt: 1,234 tokens (text 34 · 6 images 96) · KV cache 12.1 MiB · fits``."""
        parts = [f"text {self.text:,}"]
        if self.images:
            parts.append(f"{self.images} image{'s' * (self.images != 1)} {self.image:,}")
        if self.videos:
            parts.append(f"{self.videos} video{'s' * (self.videos != 1)} {self.video:,}")
        verdict = "fits" if self.fits else "too big"
        limit = f" (limit {self.limit:,})" if self.limit is not None else ""
        return (
            f"Prompt: {self.tokens:,} tokens ({' · '.join(parts)}) · KV cache {_bytes(self.kv_bytes)} · "
            f"{verdict}{limit}"
        )


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _dtype_bytes(model: Any) -> int:
    from ..models.base import model_device_dtype

    _, dtype = model_device_dtype(model)
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(model: Any) -> int:
    """KV-cache bytes one token takes: layers x KV heads x head size x 2 (keys, values) x bytes per value."""
    tc = _text_config(model)
    heads = int(getattr(tc, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    layers = int(tc.num_hidden_layers)
    return layers * kv_heads * head_dim * 2 * _dtype_bytes(model)


def _activation_bytes(model: Any, tokens: int, visual: int) -> int:
    """Peak prefill temporaries (see the module docstring)."""
    tc = _text_config(model)
    b = _dtype_bytes(model)
    d = int(tc.hidden_size)
    heads = int(getattr(tc, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or d // heads)
    f = int(getattr(tc, "intermediate_size", None) or 4 * d)
    text = tokens * (4 * d + 2 * kv_heads * head_dim + 3 * f) * b
    stats = min(2 * heads * tokens * tokens * 4, STATS_CAP)
    vision = 0
    vc = getattr(model.config, "vision_config", None)
    if visual and vc is not None:
        dv = int(getattr(vc, "hidden_size", None) or getattr(vc, "embed_dim", None) or d)
        fv = int(getattr(vc, "intermediate_size", None) or 4 * dv)
        vision = visual * 4 * (4 * dv + 3 * fv) * b
    return text + stats + vision


def _cgroup_available() -> int | None:
    """Bytes left under the container's cgroup memory limit (v2, then v1), if there is one."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def _ram_available() -> int | None:
    available: int | None = None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - not installed
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            available = None
    cgroup = _cgroup_available()
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


def device_free_bytes(device: torch.device | str) -> int | None:
    """Memory the device can still give (see the module docstring); None when it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(free + max(0, cached))
        except Exception:  # noqa: BLE001 - no CUDA context here (ZeroGPU outside its slot)
            return None
    if device.type == "cpu":
        return _ram_available()
    return None


def _counts(prepared: Any) -> tuple[int, int, int, int, int]:
    """(text, image, video tokens, images, videos) of a prepared prompt."""
    counts = prepared.modality.counts()
    return (
        int(counts.get("text", 0)),
        int(counts.get("image", 0)),
        int(counts.get("video", 0)),
        len(prepared.images),
        len(prepared.videos),
    )


def prompt_preview(
    loaded: Any,
    prepared: Any,
    max_new_tokens: int = 0,
    *,
    max_prompt_tokens: int | None | Literal["env"] = "env",
    free_bytes: int | None | Literal["device"] = "device",
) -> PromptSize:
    """Size a prepared prompt for ``loaded`` (a :class:`~mmkv.ui.models.LoadedModel`, or anything with
    ``.model``) and judge whether prompt + ``max_new_tokens`` fits. ``max_prompt_tokens`` defaults to
    ``MMKV_MAX_PROMPT_TOKENS``; ``free_bytes`` to what the model's device can hold now."""
    from ..models.base import model_device_dtype

    model = loaded.model
    if max_prompt_tokens == "env":
        max_prompt_tokens = HostingSettings.from_env().max_prompt_tokens
    device, _ = model_device_dtype(model)
    if free_bytes == "device":
        free_bytes = device_free_bytes(device)
    text, image, video, n_images, n_videos = _counts(prepared)
    tokens = int(prepared.length)
    new = max(0, int(max_new_tokens))
    per_token = kv_bytes_per_token(model)
    kv = tokens * per_token
    need = (tokens + new) * per_token + _activation_bytes(model, tokens, image + video)
    context = getattr(_text_config(model), "max_position_embeddings", None)

    limits: list[tuple[int, str]] = []  # (most prompt tokens, reason template)
    if context:
        limits.append((int(context) - new, "context"))
    if max_prompt_tokens:
        limits.append((int(max_prompt_tokens), "server"))
    usable = None
    if free_bytes is not None:
        usable = max(0, int(free_bytes * (1 - MARGIN_SHARE)) - MARGIN_BYTES)
        # the largest prompt whose estimate fits (the estimate grows with L; bisect it)
        lo, hi = 0, max(tokens, 1) * 2
        while need_of(model, hi, new, image + video, tokens) <= usable and hi < 1 << 24:
            lo, hi = hi, hi * 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if need_of(model, mid, new, image + video, tokens) <= usable:
                lo = mid
            else:
                hi = mid - 1
        limits.append((lo, "memory"))
    limit = min((n for n, _ in limits), default=None)
    size = PromptSize(
        tokens,
        text,
        image,
        video,
        n_images,
        n_videos,
        new,
        kv,
        need,
        free_bytes,
        device.type,
        None if limit is None else max(0, limit),
        True,
    )
    for most, why in limits:
        if tokens > most:
            size.fits = False
            size.reason = _reason(why, size, most, context, usable)
            size.advice = _advice(size, why)
            break
    return size


def need_of(model: Any, tokens: int, new: int, visual: int, prompt: int) -> int:
    """Estimated bytes for a prompt of ``tokens`` tokens (visual tokens scaled with it)."""
    scaled_visual = visual * tokens // max(prompt, 1)
    return (tokens + new) * kv_bytes_per_token(model) + _activation_bytes(model, tokens, scaled_visual)


def _reason(why: str, size: PromptSize, most: int, context: int | None, usable: int | None) -> str:
    n = f"{size.tokens:,}"
    if why == "context":
        return f"This prompt is {n} tokens + up to {size.max_new_tokens:,} new; the model reads at most {int(context or 0):,}."
    if why == "server":
        return f"This prompt is {n} tokens; this server allows {most:,} (MMKV_MAX_PROMPT_TOKENS)."
    where = "GPU" if size.device == "cuda" else "server"
    return f"This prompt ({n} tokens) needs about {_bytes(size.need_bytes)}; the {where} has {_bytes(usable or 0)} to spare."


def _advice(size: PromptSize, why: str) -> str:
    steps = []
    if size.images:
        steps.append("fewer images")
    if size.videos:
        steps.append("fewer frames per video")
    if size.text > size.image + size.video:
        steps.append("shorter text")
    if not steps:
        steps.append("shorter text")
    if why == "context" and size.max_new_tokens:
        steps.append("fewer max new tokens")
    tip = f"Shrink it to at most {size.limit:,} tokens: {', '.join(steps)}"
    if size.image + size.video > size.text:
        tip += " (or lower MMKV_MAX_IMAGE_TOKENS)"
    return tip + "."


def check_capacity(loaded: Any, prepared: Any, max_new_tokens: int = 0, **kwargs: Any) -> PromptSize:
    """:func:`prompt_preview`, raising :class:`UserError` (what is exceeded, how to shrink) when it does not fit."""
    size = prompt_preview(loaded, prepared, max_new_tokens, **kwargs)
    if not size.fits:
        raise UserError(size.message())
    return size
