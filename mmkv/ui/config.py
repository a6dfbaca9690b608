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
