"""Checking what the user sent: files, prompt, budget, method hyper-parameters, sweeps.

Every check raises :class:`~mmkv.ui.errors.UserError` with what was wrong and what to do.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..inputs.prompt import user_turn
from ..methods import METHODS, make_method
from .config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Limits
from .errors import UserError

__all__ = [
    "file_path",
    "check_files",
    "check_image",
    "check_video",
    "user_content",
    "parse_budget",
    "parse_params",
    "method_defaults",
    "params_text",
    "parse_sweep",
    "check_method",
]


def file_path(entry: Any) -> str:
    """A path from what Gradio hands over for an uploaded file (str, dict with "path", FileData)."""
    if isinstance(entry, (str, os.PathLike)):
        return str(entry)
    if isinstance(entry, dict):
        value = entry.get("path") or entry.get("name")
        if value:
            return str(value)
    value = getattr(entry, "path", None) or getattr(entry, "name", None)
    if value:
        return str(value)
    raise UserError(f"could not read the uploaded file ({type(entry).__name__}); upload it again")


def _size_check(path: Path, limits: Limits) -> None:
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise UserError(
            f"{path.name} is {size / 2**20:.1f} MB; the limit is {limits.max_upload_mb:g} MB per file: "
            "upload a smaller or shorter file (resize the image, trim or re-encode the video)"
        )
    if size == 0:
        raise UserError(f"{path.name} is empty (0 bytes): upload the file again")


def check_image(path: Path, limits: Limits) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise UserError(
                    f"{path.name} is {w}×{h} pixels, more than {limits.max_image_pixels / 1e6:.0f} MP: resize it first"
                )
            im.load()
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(
            f"cannot read {path.name} as an image ({type(exc).__name__}): upload a PNG, JPEG or WebP file"
        ) from exc


def check_video(path: Path, limits: Limits) -> float | None:
    """Open the video with OpenCV; return its duration in seconds (None if the container does not say)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise UserError(f"cannot open {path.name} as a video: upload an MP4 or WebM file")
        ok, _ = cap.read()
        if not ok:
            raise UserError(
                f"{path.name} has no readable frames: it is corrupt or not a video; upload an MP4 or WebM file"
            )
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count = float(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
    finally:
        cap.release()
    if fps > 0 and math.isfinite(fps) and count > 0:
        duration = count / fps
        if duration > limits.max_video_seconds:
            raise UserError(
                f"{path.name} is {duration:.0f} s long; this app takes videos up to {limits.max_video_seconds:.0f} s "
                f"(at most {limits.max_frames} frames are sampled from it): trim the video and upload it again"
            )
        return duration
    return None


def check_files(files: Sequence[Any] | None, limits: Limits) -> list[tuple[str, str]]:
    """``[(kind, path)]`` with kind "image" or "video", after checking type, size, readability, length."""
    out: list[tuple[str, str]] = []
    for entry in files or []:
        path = Path(file_path(entry))
        if not path.is_file():
            raise UserError(f"the uploaded file {path.name} is gone from the server: upload it again")
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            kind = "image"
        elif suffix in VIDEO_EXTENSIONS:
            kind = "video"
        else:
            raise UserError(
                f"{path.name}: unsupported file type {suffix or '(none)'}; upload images "
                f"({', '.join(IMAGE_EXTENSIONS)}) or videos ({', '.join(VIDEO_EXTENSIONS)})"
            )
        _size_check(path, limits)
        if kind == "image":
            check_image(path, limits)
        else:
            check_video(path, limits)
        out.append((kind, str(path)))
    n_images = sum(k == "image" for k, _ in out)
    n_videos = sum(k == "video" for k, _ in out)
    if n_images > limits.max_images:
        raise UserError(f"{n_images} images attached; the limit is {limits.max_images}: remove some")
    if n_videos > limits.max_videos:
        raise UserError(f"{n_videos} videos attached; the limit is {limits.max_videos}: remove some")
    return out


def user_content(text: str | None, files: Sequence[Any] | None, limits: Limits) -> list[dict[str, Any]]:
    """The content parts of one user message: media first (in upload order), then the question.

    Built by :func:`mmkv.inputs.prompt.user_turn`, as in the CLI, the Python API and the eval harness; image
    labels, where a model needs them, come from its chat template.
    """
    text = (text or "").strip()
    if not text:
        raise UserError("the prompt is empty: type a question about your images or video (or click an example)")
    if len(text) > limits.max_prompt_chars:
        raise UserError(f"the question has {len(text)} characters; the limit is {limits.max_prompt_chars}: shorten it")
    media = [{"type": kind, kind: path} for kind, path in check_files(files, limits)]
    return user_turn(text, media)["content"]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise UserError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{what} must be a finite number, got {value!r}")
    return number


def parse_budget(ratio: Any, tokens: Any = 0) -> float | int:
    """The budget: ``tokens`` (absolute tokens per layer and KV head) when positive, else ``ratio`` in (0, 1]."""
    n = _number(tokens if tokens not in (None, "") else 0, "the token budget")
    if n != 0:
        if n < 1 or n != int(n):
            raise UserError(
                f"the token budget must be a whole number of tokens ≥ 1 (or 0 to use the ratio), got {tokens}"
            )
        return int(n)
    r = _number(ratio, "the budget ratio")
    if not 0.0 < r <= 1.0:
        raise UserError(f"the budget ratio must be in (0, 1] (e.g. 0.2 keeps 20% of the tokens), got {ratio}")
    return r


def check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(sorted(METHODS))}")
    return method


def method_defaults(method: str) -> dict[str, Any]:
    cls = METHODS[check_method(method)]
    return {f.name: getattr(cls(), f.name) for f in fields(cls)}


def params_text(method: str) -> str:
    """The method's hyper-parameters with their defaults, as editable JSON."""
    return json.dumps(method_defaults(method), indent=1)


def parse_params(method: str, text: str | None) -> dict[str, Any]:
    """Hyper-parameters from the accordion's JSON; only values that differ from the defaults are returned."""
    check_method(method)
    text = (text or "").strip()
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"the hyper-parameters are not valid JSON ({exc.msg} at line {exc.lineno}): fix or clear them"
        ) from None
    if not isinstance(params, dict):
        raise UserError('the hyper-parameters must be a JSON object such as {"window": 32}')
    defaults = method_defaults(method)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UserError(
            f"{method} has no hyper-parameter {', '.join(unknown)}; its hyper-parameters are: "
            f"{', '.join(defaults) or 'none'}"
        )
    changed = {k: v for k, v in params.items() if defaults.get(k) != v}
    try:
        make_method(method, **changed)
    except (ValueError, TypeError) as exc:
        raise UserError(f"bad hyper-parameters for {method}: {exc}") from None
    return changed


def parse_sweep(text: str | None) -> list[float | int]:
    """Budgets to sweep, e.g. ``"0.1, 0.3, 0.6"`` or ``"32 64 128"``; empty means no sweep."""
    text = (text or "").replace(";", ",").replace(" ", ",")
    values: list[float | int] = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        number = _number(piece, "a swept budget")
        if 0 < number <= 1:
            values.append(number)
        elif number > 1 and number == int(number):
            values.append(int(number))
        else:
            raise UserError(f"swept budget {piece!r}: use ratios in (0, 1] or whole token counts ≥ 2")
    return list(dict.fromkeys(values))
