"""App settings: limits (overridable by environment variables) and the default model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..bundled import BUNDLED_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ".cache/demo-model"
RANDOM_MODEL_NOTICE = (
    "No bundled teaching model was found, so the app built a tiny **random-weight** Qwen2.5-VL: its answers "
    "are noise, but the compression, the kept/evicted cells, the bytes and the timings are real. "
    "Set `MMKV_MODEL` to a checkpoint directory or hub id, or pick a model below."
)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _env_limit(name: str, default: float | None) -> float | None:
    """A positive number from the environment; ``0``, ``none`` or ``off`` mean no limit; unset: ``default``."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("0", "none", "off", "no", "unlimited"):
        return None
    try:
        value = float(text)
    except ValueError:
        return default
    return value if value > 0 else None


def _env_int_limit(name: str, default: float | None) -> int | None:
    value = _env_limit(name, default)
    return None if value is None else int(value)


def is_hosted() -> bool:
    """Serving the public: ``MMKV_HOSTED=1`` (``0`` turns it off), else a Hugging Face Space (``SPACE_ID``)."""
    flag = os.environ.get("MMKV_HOSTED", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return bool(os.environ.get("SPACE_ID", "").strip())


#: ``(hosted, local)`` defaults of the hosting settings (see :class:`HostingSettings`).
HOSTING_DEFAULTS: dict[str, tuple[float | None, float | None]] = {
    "max_model_gb": (20.0, None),  # a 7B model in bf16 is ~16.6 GB of weights
    "max_image_tokens": (1024, 4096),  # Qwen-VL: ~0.8 MP / ~3.2 MP per image
    "max_video_tokens": (4096, 16384),  # e.g. 16 frames at 512 tokens per 2-frame group
    "max_prompt_tokens": (16384, None),
}


@dataclass(frozen=True)
class HostingSettings:
    """What visitors may load and how big a prompt may get (``MMKV_*`` variables, hosted defaults).

    - ``allowed_models``: names visitors may load (``MMKV_ALLOWED_MODELS``, comma-separated; ``*`` =
      anything); ``None`` = anything. Hosted and unset: only the default model and the bundled one.
      The default model and the bundled one are always allowed.
    - ``max_model_gb``: refuse checkpoints whose weight files are bigger (``MMKV_MAX_MODEL_GB``), checked
      before any download.
    - ``max_image_tokens`` / ``max_video_tokens``: visual tokens per image / per video
      (``MMKV_MAX_IMAGE_TOKENS`` / ``MMKV_MAX_VIDEO_TOKENS``), applied to each model's processor at load.
    - ``max_prompt_tokens``: longest prompt (``MMKV_MAX_PROMPT_TOKENS``), on top of the model's context
      and the memory the device has left.
    - ``hub_timeout_s``: how long to wait for the Hugging Face hub before saying it is unreachable
      (``MMKV_HUB_TIMEOUT``).
    """

    hosted: bool = False
    allowed_models: tuple[str, ...] | None = None
    max_model_gb: float | None = None
    max_image_tokens: int | None = 4096
    max_video_tokens: int | None = 16384
    max_prompt_tokens: int | None = None
    hub_timeout_s: float = 1.5

    @classmethod
    def from_env(cls) -> HostingSettings:
        hosted = is_hosted()
        pick = 0 if hosted else 1
        text = os.environ.get("MMKV_ALLOWED_MODELS")
        names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
        if "*" in names or (text is None and not hosted):
            allowed: tuple[str, ...] | None = None
        else:
            allowed = names
        d = {k: v[pick] for k, v in HOSTING_DEFAULTS.items()}
        return cls(
            hosted=hosted,
            allowed_models=allowed,
            max_model_gb=_env_limit("MMKV_MAX_MODEL_GB", d["max_model_gb"]),
            max_image_tokens=_env_int_limit("MMKV_MAX_IMAGE_TOKENS", d["max_image_tokens"]),
            max_video_tokens=_env_int_limit("MMKV_MAX_VIDEO_TOKENS", d["max_video_tokens"]),
            max_prompt_tokens=_env_int_limit("MMKV_MAX_PROMPT_TOKENS", d["max_prompt_tokens"]),
            hub_timeout_s=max(0.1, _env_float("MMKV_HUB_TIMEOUT", 1.5)),
        )


@dataclass
class Limits:
    """What one request may ask for (keeps one heavy request from starving the queue)."""

    max_upload_mb: float = field(default_factory=lambda: _env_float("MMKV_MAX_UPLOAD_MB", 25.0))
    max_video_seconds: float = field(default_factory=lambda: _env_float("MMKV_MAX_VIDEO_SECONDS", 120.0))
    max_frames: int = 32  # frames sampled from one video
    max_images: int = 8
    max_videos: int = 2
    max_image_pixels: int = 40_000_000
    max_new_tokens: int = 256
    max_prompt_chars: int = 20_000
    max_compare_runs: int = 24  # methods x swept budgets
    max_turns: int = 8  # chat turns kept in the conversation

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v")


def default_model(
    root: str | os.PathLike | None = None, build: bool = True, bundled: str | os.PathLike = BUNDLED_MODEL
) -> tuple[str, str | None]:
    """``(model path or hub id, notice or None)``: ``MMKV_MODEL``, else the bundled teaching model,
    else a tiny random Qwen2.5-VL written to ``<root>/.cache/demo-model`` (with a notice saying so)."""
    if root is None:  # a checkout keeps it in its .cache/; an installed package in ~/.cache/mmkv/
        root = REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.home() / ".cache" / "mmkv"
    root = Path(root)
    env = os.environ.get("MMKV_MODEL", "").strip()
    if env:
        return env, None
    if (Path(bundled) / "config.json").is_file():
        return str(bundled), None
    demo = root / DEMO_MODEL
    if build and not (demo / "config.json").is_file():
        from ..testing.tiny import save_tiny

        save_tiny("qwen2_5_vl", demo)
    return str(demo), RANDOM_MODEL_NOTICE
