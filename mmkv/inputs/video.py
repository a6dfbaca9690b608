"""Video and image loading without torchvision: OpenCV decodes, PIL carries the frames.

transformers' video processors need torchvision, which this project does not depend on, so videos are
decoded here and turned into model inputs by the adapters in :mod:`mmkv.models`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError


@dataclass
class VideoFrames:
    """Frames sampled from one video, with their timestamps in seconds."""

    frames: list[Image.Image]
    timestamps: list[float]
    fps: float  # sampling rate of the returned frames (frames per second of video time)
    duration: float | None = None  # length of the whole source video in seconds, when known


__all__ = ["VideoFrames", "read_video", "as_video_frames", "load_image", "sample_indices"]


def load_image(image: Any) -> Image.Image:
    """A path (str/Path) or PIL image -> RGB PIL image, with a fixable error for anything else."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image file not found: {str(path)!r}; check the path")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(
                f"cannot read {str(path)!r} as an image ({exc}); pass a PNG/JPEG/WebP file or a PIL.Image"
            ) from exc
    raise ValueError(f"an image must be a file path or a PIL.Image, got {type(image).__name__}")


def sample_indices(total: int, src_fps: float, num_frames: int | None, fps: float | None) -> list[int]:
    """Frame indices to keep: ``fps`` frames per second of video time, else ``num_frames`` evenly spread.

    Even spreading picks the centre of each of ``num_frames`` equal segments, so both ends are covered.
    """
    if total <= 0:
        return []
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        duration = total / src_fps
        count = max(1, int(math.floor(duration * fps + 1e-6)))
        step = src_fps / fps
        return sorted({min(total - 1, int(round(i * step))) for i in range(count)})
    if num_frames is None:
        return list(range(total))
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if num_frames >= total:
        return list(range(total))
    seg = total / num_frames
    return [min(total - 1, int(seg * i + seg / 2)) for i in range(num_frames)]


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = 8,
    fps: float | None = None,
    max_frames: int = 64,
) -> VideoFrames:
    """Decode a video file with OpenCV and sample frames.

    ``fps`` (frames per second of video time) wins over ``num_frames`` (evenly spread) when given;
    ``num_frames=None`` and ``fps=None`` keeps every frame. Frames come back as RGB PIL images with
    their timestamps in seconds. More than ``max_frames`` sampled frames is an error (long prompts
    are better made deliberately).
    """
    import cv2

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"video file not found: {str(p)!r}; check the path")
    cap = cv2.VideoCapture(str(p))
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot open {str(p)!r} as a video; pass an mp4/avi/webm file OpenCV can decode")
        src_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not math.isfinite(src_fps) or src_fps <= 0:
            src_fps = 24.0  # containers without a rate: assume film rate (transformers does the same)
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        frames_bgr: list[Any] = []
        if total > 0:
            wanted = sample_indices(total, src_fps, num_frames, fps)
            _check_max(len(wanted), max_frames, p)
            want = set(wanted)
            index = 0
            kept: dict[int, Any] = {}
            while index <= wanted[-1]:
                ok = cap.grab()
                if not ok:
                    break
                if index in want:
                    ok, frame = cap.retrieve()
                    if ok:
                        kept[index] = frame
                index += 1
            # Frame counts in headers can overstate; keep what was decodable, in order.
            indices = [i for i in wanted if i in kept]
            frames_bgr = [kept[i] for i in indices]
            if not frames_bgr and index == 0:
                total = 0
        if total <= 0:
            # Unknown or lying frame count: decode everything, then sample.
            all_frames = []
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                all_frames.append(frame)
            if not all_frames:
                raise ValueError(
                    f"{str(p)!r} has no decodable frames; it is not a video or is corrupt (pass an mp4/avi/webm file)"
                )
            total = len(all_frames)
            indices = sample_indices(total, src_fps, num_frames, fps)
            _check_max(len(indices), max_frames, p)
            frames_bgr = [all_frames[i] for i in indices]
    finally:
        cap.release()
    if not frames_bgr:
        raise ValueError(f"{str(p)!r} has zero readable frames; pass a video OpenCV can decode")
    images = [Image.fromarray(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)) for f in frames_bgr]
    timestamps = [i / src_fps for i in indices]
    # frames kept per second of video (transformers' ``VideoMetadata.sampled_fps``)
    rate = float(fps) if fps is not None else len(indices) * src_fps / total
    return VideoFrames(frames=images, timestamps=timestamps, fps=rate, duration=total / src_fps)


def _check_max(count: int, max_frames: int, path: Path) -> None:
    if count > max_frames:
        raise ValueError(
            f"sampling {str(path)!r} gives {count} frames, more than max_frames={max_frames}; "
            "lower fps or num_frames (or raise max_frames)"
        )


def as_video_frames(
    video: Any,
    num_frames: int | None = 8,
    fps: float | None = None,
    max_frames: int = 64,
) -> VideoFrames:
    """A video as given in a chat -> :class:`VideoFrames`.

    - ``str`` / ``Path``: decoded with :func:`read_video` (``fps`` = sampling rate, wins over ``num_frames``).
    - a list of PIL images / paths: frames already sampled. ``fps`` is their rate (default 1 frame per
      second, used for timestamps); ``num_frames``, if smaller than the list, keeps that many evenly.
    - a :class:`VideoFrames`: returned as is.
    """
    if isinstance(video, VideoFrames):
        return video
    if isinstance(video, (str, os.PathLike)):
        return read_video(video, num_frames=num_frames, fps=fps, max_frames=max_frames)
    if isinstance(video, Sequence) and not isinstance(video, (bytes, str)):
        frames = [load_image(f) for f in video]
        if not frames:
            raise ValueError("a video given as a list of frames needs at least one frame")
        rate = float(fps) if fps else 1.0
        indices = list(range(len(frames)))
        if num_frames is not None and num_frames < len(frames):
            indices = sample_indices(len(frames), rate, num_frames, None)
        if len(indices) > max_frames:
            raise ValueError(
                f"the video has {len(indices)} frames, more than max_frames={max_frames}; lower fps or num_frames"
            )
        return VideoFrames(
            frames=[frames[i] for i in indices],
            timestamps=[i / rate for i in indices],
            fps=rate * len(indices) / len(frames) if len(indices) != len(frames) else rate,
            duration=len(frames) / rate,
        )
    raise ValueError(
        f"a video must be a file path, a list of frames (PIL images) or VideoFrames, got {type(video).__name__}"
    )
