"""One prompt builder: (images, videos, text) -> the chat every entry point feeds the model.

The CLI, the Python API (:func:`mmkv.chat`), the app and the eval harness all build their user turn
here, so the same inputs give the same prompt everywhere. Model-specific decoration (e.g. image labels
such as "Image 1:") belongs to the model's chat template, never to a caller: the bundled teaching model's
template labels images itself, as Qwen's templates do with ``add_vision_id``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

Chat = list[dict[str, Any]]
#: One item of a user turn's media, in order: an image (path or PIL image), or a content part dict —
#: ``{"type": "video", "video": path or frames}``, ``{"type": "text", "text": ...}`` (text between media).
Media = Any


def _part(item: Media) -> dict[str, Any]:
    if isinstance(item, dict):
        kind = item.get("type") or ("video" if "video" in item else "image" if "image" in item else None)
        if kind not in ("image", "video", "text") or kind not in item:
            raise ValueError(f"a media item must be an image, a video or text, got {item!r}")
        return {**item, "type": kind}
    if isinstance(item, Image.Image):
        return {"type": "image", "image": item}
    if isinstance(item, (str, os.PathLike)):
        return {"type": "image", "image": str(item)}
    raise ValueError(f"unsupported media item {type(item).__name__}: pass an image path, a PIL image or a video dict")


def user_turn(question: str, media: Sequence[Media] = ()) -> dict[str, Any]:
    """A user message: ``media`` in order (images, video and text parts), then ``question``.

    Raises ``ValueError`` for an empty question.
    """
    text = (question or "").strip() if isinstance(question, str) else question
    if not isinstance(text, str) or not text:
        raise ValueError(
            'the prompt is empty: give a question or instruction (e.g. --prompt "Which image has a red circle?")'
        )
    return {"role": "user", "content": [*(_part(m) for m in media), {"type": "text", "text": text}]}


def chat(
    question: str,
    images: Sequence[str | os.PathLike | Image.Image] = (),
    videos: Sequence[str | os.PathLike | Sequence[Image.Image]] = (),
    *,
    media: Sequence[Media] | None = None,
    history: Chat | None = None,
) -> Chat:
    """The chat for one question about ``images`` then ``videos`` (or about ``media`` in a given order).

    ``history`` (earlier turns, answers included) is kept in front. This is what ``mmkv run``, the app
    and the eval harness build, so ``mmkv.generate(model, processor, mmkv.chat(...))`` sees exactly
    their prompt::

        mmkv.chat("Which image has the red circle?", images=["a.png", "b.png"])
    """
    if media is None:
        media = [*images, *({"type": "video", "video": str(v) if isinstance(v, os.PathLike) else v} for v in videos)]
    elif images or videos:
        raise ValueError("pass either media (in order) or images/videos, not both")
    return [*(history or []), user_turn(question, media)]
