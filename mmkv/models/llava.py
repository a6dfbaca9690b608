"""LLaVA-1.5 (``llava``) and LLaVA-OneVision (``llava_onevision``).

LLaVA-1.5 has no video input: a video is sampled and its frames are fed as consecutive images (the
ModalityMap marks them VIDEO with ``source`` = video index and ``frame`` = frame index).

LLaVA-OneVision mirrors the model's own feature packing:

- one image in the prompt ("anyres"): the base view (``side x side`` tokens, item tile ``"global"``)
  followed by the stitched, unpadded high-resolution grid with an ``image_newline`` token closing every
  row (item tile ``"anyres"``; newline tokens get row = col = -1);
- several images: each is only its base view plus one trailing newline token (item tile ``"full"``);
- video (``pixel_values_videos``, built here because the video processor needs torchvision): every frame
  is resized to the vision tower's input size; the model pools each frame's grid 2x2
  (``ceil(side/2)`` squared tokens) and appends one newline token after the last frame.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..compat import model_config
from ..inputs.modality import IMAGE, VIDEO, ModalityMap, VisualItem, grid_item
from .base import (
    Chat,
    ModelAdapter,
    PreparedInputs,
    VideoFrames,
    as_chat,
    bounded_frames,
    bounds_of,
    cap_frames,
    collect_media,
    context_length_of,
    encode_text,
    encoder_counts,
    expand_placeholders,
    frames_for_budget,
    load_processor_without_video,
    recall_map,
    remember_map,
    render_chat,
    set_bounds,
    to_model,
)

__all__ = ["LlavaAdapter", "LlavaOnevisionAdapter", "onevision_image_layout", "frames_as_images"]

Cells = tuple[list[int], list[int], list[int]]


def _dim(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key) or size.get("shortest_edge")
    return getattr(size, key, None) or getattr(size, "shortest_edge", None)


def frames_as_images(chat: Chat, videos: list[VideoFrames]) -> tuple[Chat, list[tuple[int, int, int]]]:
    """Replace each video part by one image part per sampled frame.

    Returns the new chat and, per image part in chat order, ``(modality, source, frame)``.
    """
    out: Chat = []
    sources: list[tuple[int, int, int]] = []
    n_images = n_videos = 0
    for message in chat:
        content = []
        for part in message["content"]:
            if part["type"] == "image":
                content.append(part)
                sources.append((IMAGE, n_images, 0))
                n_images += 1
            elif part["type"] == "video":
                for f, frame in enumerate(videos[n_videos].frames):
                    content.append({"type": "image", "image": frame})
                    sources.append((VIDEO, n_videos, f))
                n_videos += 1
            else:
                content.append(part)
        out.append({"role": message["role"], "content": content})
    return out, sources


def _chunks(positions: list[int], length: int, what: str) -> tuple[int, list[int]]:
    if len(positions) < length:
        raise ValueError(f"{what}: expected {length} placeholder tokens, the prompt has only {len(positions)} left")
    chunk = positions[:length]
    if chunk[-1] - chunk[0] != length - 1:
        raise ValueError(f"{what}: its {length} placeholder tokens are not contiguous in the prompt")
    return chunk[0], chunk


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: one fixed-size view per image, ``(crop/patch)^2`` tokens in row-major order."""

    family = "llava"
    model_types = ("llava",)

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        from transformers import LlavaProcessor

        return load_processor_without_video(LlavaProcessor, name_or_path, **kwargs)

    def _tokens_per_image(self, model: torch.nn.Module, processor: Any, height: int, width: int) -> int:
        patch = getattr(processor, "patch_size", None) or model_config(model).vision_config.patch_size
        strategy = (
            getattr(processor, "vision_feature_select_strategy", None)
            or model_config(model).vision_feature_select_strategy
        )
        extra = getattr(processor, "num_additional_image_tokens", None)
        if extra is None:
            extra = 1 if "clip" in getattr(model_config(model).vision_config, "model_type", "") else 0
        n = (height // patch) * (width // patch) + extra
        return n - 1 if strategy == "default" else n

    def _fixed_tokens(self, model: torch.nn.Module, processor: Any) -> int:
        """Tokens of every picture: the vision tower's fixed input size (the processor crops to it)."""
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None)
        side = model_config(model).vision_config.image_size
        height = _dim(crop, "height") or side
        width = _dim(crop, "width") or side
        return self._tokens_per_image(model, processor, int(height), int(width))

    def bound_visual_tokens(
        self, model: torch.nn.Module, processor: Any, image_tokens: int | None, video_tokens: int | None
    ) -> str:
        """Every picture is the tower's fixed size (e.g. 576 tokens), so an image cannot be made cheaper;
        a video (its frames fed as pictures) keeps at most ``video_tokens // tokens_per_picture`` frames."""
        set_bounds(processor, image_tokens, video_tokens)
        per = self._fixed_tokens(model, processor)
        cap = self.frame_cap(model, processor)
        return f"images: fixed {per} tokens each" + ("" if cap is None else f"; videos: at most {cap} frames")

    def frame_cap(self, model: torch.nn.Module, processor: Any) -> int | None:
        return frames_for_budget(bounds_of(processor).video_tokens, self._fixed_tokens(model, processor))

    def prepare(
        self,
        model: torch.nn.Module,
        processor: Any,
        chat: Chat | str,
        *,
        num_frames: int | None = None,
        video_fps: float | None = None,
    ) -> PreparedInputs:
        chat = as_chat(chat)
        cap = self.frame_cap(model, processor)
        images, videos = collect_media(chat, bounded_frames(num_frames, video_fps, cap), video_fps)
        videos = [cap_frames(v, cap) for v in videos]
        _, sources = frames_as_images(chat, videos)
        pictures = _resolved_images(images, videos, sources)
        extra: dict[str, Any] = {}
        repl: list[str] = []
        if pictures:
            pv = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
            extra["pixel_values"] = pv
            n = self._tokens_per_image(model, processor, pv.shape[-2], pv.shape[-1])
            repl = [processor.image_token * n] * len(pictures)

        def encode(c: Chat) -> list[int]:
            c, _ = frames_as_images(c, videos)
            return encode_text(processor, expand_placeholders(render_chat(processor, c), {processor.image_token: repl}))

        ids = encode(chat)
        input_ids = torch.tensor([ids], dtype=torch.long)
        inputs = to_model({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}, model)
        modality = self.modality_map(model, inputs, sources=sources)
        remember_map(model, ids, modality)
        return PreparedInputs(
            inputs=inputs,
            modality=modality,
            context_length=context_length_of(encode, chat, ids),
            images=images,
            videos=videos,
        )

    def modality_map(self, model: torch.nn.Module, inputs: dict[str, Any], **kwargs: Any) -> ModalityMap:
        """Chunks of ``<image>`` tokens, one per entry of ``pixel_values``; grid = (H/patch, W/patch).

        ``sources`` (optional): ``(modality, source, frame)`` per image input, for frames fed as images.
        Tokens beyond ``rows*cols`` in a chunk (a kept CLS token) lead the chunk with row = col = -1.
        """
        ids = inputs["input_ids"].reshape(-1).cpu()
        positions = (ids == model_config(model).image_token_id).nonzero().reshape(-1).tolist()
        if not positions:
            return ModalityMap.text_only(ids.numel())
        if not kwargs.get("sources") and (cached := recall_map(model, ids)) is not None:
            return cached  # the map prepare() made: it knows which images are video frames
        pv = inputs.get("pixel_values")
        vc = model_config(model).vision_config
        patch = vc.patch_size
        if pv is not None:
            n_images = pv.shape[0]
            rows, cols = pv.shape[-2] // patch, pv.shape[-1] // patch
        else:  # a forward from generate() with mm_encoder_outputs: the vision input is image_size square
            rows = cols = vc.image_size // patch
            counts = encoder_counts((inputs.get("mm_encoder_outputs") or {}).get("image"))
            n_images = len(counts) if counts else max(1, len(positions) // (rows * cols))
        sources = kwargs.get("sources") or [(IMAGE, i, 0) for i in range(n_images)]
        if len(positions) % n_images:
            raise ValueError(f"{len(positions)} image tokens cannot be split evenly over {n_images} images")
        per = len(positions) // n_images
        lead = per - rows * cols
        if lead < 0:
            raise ValueError(f"{per} tokens per image is fewer than the {rows}x{cols} patch grid")
        items: list[VisualItem] = []
        cells: list[Cells] = []
        for k in range(n_images):
            start, chunk = _chunks(positions[k * per :], per, f"image input {k}")
            modality, source, frame = sources[k]
            item, (pos, r, c) = grid_item(modality, source, frame, rows, cols, start + lead)
            item.start, item.length = start, per
            items.append(item)
            cells.append((pos, r, c))
        return ModalityMap.from_items(ids.numel(), items, cells)

    def media_suffix(self, prepared: PreparedInputs, images: int, videos: int) -> dict[str, Any]:
        """The last pictures: LLaVA-1.5 reads every image and video frame as one ``pixel_values`` entry."""
        pictures = images + sum(len(v.frames) for v in prepared.videos[len(prepared.videos) - videos :])
        return {"pixel_values": prepared.inputs["pixel_values"][-pictures:]} if pictures else {}


def _resolved_images(
    images: list[Image.Image], videos: list[VideoFrames], sources: list[tuple[int, int, int]]
) -> list[Image.Image]:
    """The RGB pictures behind the image parts after :func:`frames_as_images`, in order."""
    return [images[s] if m == IMAGE else videos[s].frames[f] for m, s, f in sources]


# ----------------------------------------------------------------------------------------------
# LLaVA-OneVision
# ----------------------------------------------------------------------------------------------

# A segment of an image span: (tile name, rows, cols, newline mode) with newline mode
# "none" (rows*cols tokens), "end" (one newline after the grid) or "rows" (a newline closing each row).
Segment = tuple[str, int, int, str]


def onevision_image_layout(config: Any, height: int, width: int, multi_image: bool) -> list[Segment]:
    """The token layout LLaVA-OneVision's ``pack_image_features`` produces for one image of ``height x width``."""
    from transformers.image_processing_utils import select_best_resolution

    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    if multi_image:
        return [("full", side, side, "end")]
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    cur_h, cur_w = (best_h // vc.image_size) * side, (best_w // vc.image_size) * side
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    max_patches = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).strip("anyres_max_"))  # noqa: B005 -- as transformers' LLaVA-OneVision
    ratio = math.sqrt(cur_h * cur_w / (max_patches * side**2))
    if ratio > 1.1:
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return [("global", side, side, "none"), ("anyres", cur_h, cur_w, "rows")]


def _segment_length(seg: Segment) -> int:
    _, rows, cols, mode = seg
    return rows * cols + (1 if mode == "end" else rows if mode == "rows" else 0)


def _segment_cells(seg: Segment, start: int) -> Cells:
    _, rows, cols, mode = seg
    pos: list[int] = []
    r: list[int] = []
    c: list[int] = []
    p = start
    for i in range(rows):
        for j in range(cols):
            pos.append(p)
            r.append(i)
            c.append(j)
            p += 1
        if mode == "rows":
            pos.append(p)
            r.append(-1)
            c.append(-1)
            p += 1
    if mode == "end":
        pos.append(p)
        r.append(-1)
        c.append(-1)
    return pos, r, c


def _onevision_layouts_without_sizes(
    config: Any, positions: list[int], counts: list[int] | None
) -> list[list[Segment]]:
    """Best-effort image layouts when ``image_sizes`` is missing (a forward call made by ``generate``).

    Multi-image spans (``side^2 + 1`` tokens) are exact; a single anyres image's grid shape is ambiguous
    from its token count alone, so it becomes one ``"anyres"`` row of all its remaining tokens.
    """
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    if counts is None:
        counts = [len(positions)] if positions else []
    layouts: list[list[Segment]] = []
    for n in counts:
        if n == side * side + 1:
            layouts.append([("full", side, side, "end")])
        elif n > side * side:
            layouts.append([("global", side, side, "none"), ("anyres", 1, n - side * side, "none")])
        else:
            layouts.append([("full", 1, n, "none")])
    return layouts


class LlavaOnevisionAdapter(ModelAdapter):
    """LLaVA-OneVision: anyres tiles with ``image_newline`` tokens; videos as pooled frame grids."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        from transformers import LlavaOnevisionProcessor

        return load_processor_without_video(LlavaOnevisionProcessor, name_or_path, **kwargs)

    def video_pixels(self, processor: Any, video: VideoFrames) -> torch.Tensor:
        """``[frames, 3, H, W]``: each frame resized to the vision input size, rescaled, normalised."""
        ip = processor.image_processor
        vs = dict(getattr(processor, "video_settings", None) or {})
        size = vs.get("size") or ip.size
        height = size["height"] if isinstance(size, dict) else size.height
        width = size["width"] if isinstance(size, dict) else size.width
        mean = np.asarray(vs.get("image_mean", ip.image_mean), dtype=np.float32)
        std = np.asarray(vs.get("image_std", ip.image_std), dtype=np.float32)
        scale = float(vs.get("rescale_factor", ip.rescale_factor))
        arr = np.stack(
            [
                np.asarray(f.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
                for f in video.frames
            ]
        )
        arr = (arr * scale - mean) / std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))

    def bound_visual_tokens(
        self, model: torch.nn.Module, processor: Any, image_tokens: int | None, video_tokens: int | None
    ) -> str:
        """Images: a lone image (the "anyres" layout) is downscaled before processing until its base
        view + high-resolution grid fit ``image_tokens`` (the smallest layout, one tile, is the floor);
        several images are a fixed ``side^2 + 1`` tokens each. Videos: fixed pooled tokens per frame, so
        at most ``video_tokens // per_frame`` frames."""
        bounds = set_bounds(processor, image_tokens, video_tokens)
        vc = model_config(model).vision_config
        side = vc.image_size // vc.patch_size
        floor = sum(
            _segment_length(s) for s in onevision_image_layout(model_config(model), vc.image_size, vc.image_size, False)
        )
        what = f"several images: fixed {side * side + 1} tokens each"
        if bounds.image_tokens is not None:
            what = f"a lone image: up to {max(bounds.image_tokens, floor)} tokens (floor {floor}); " + what
        cap = self.frame_cap(model, processor)
        return what + ("" if cap is None else f"; videos: at most {cap} frames")

    def frame_cap(self, model: torch.nn.Module, processor: Any) -> int | None:
        vc = model_config(model).vision_config
        pooled = math.ceil((vc.image_size // vc.patch_size) / 2) ** 2
        return frames_for_budget(bounds_of(processor).video_tokens, pooled)

    def bounded_image(self, model: torch.nn.Module, processor: Any, image: Image.Image) -> Image.Image:
        """A lone image downscaled (aspect kept) until its anyres layout fits the image bound."""
        budget = bounds_of(processor).image_tokens
        if budget is None:
            return image
        vc = model_config(model).vision_config

        def tokens(w: int, h: int) -> int:
            return sum(_segment_length(s) for s in onevision_image_layout(model_config(model), h, w, False))

        w, h = image.size
        scale = 1.0
        while tokens(max(1, round(w * scale)), max(1, round(h * scale))) > budget and max(w, h) * scale > vc.image_size:
            scale *= 0.9
        if scale == 1.0:
            return image
        return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)

    def prepare(
        self,
        model: torch.nn.Module,
        processor: Any,
        chat: Chat | str,
        *,
        num_frames: int | None = None,
        video_fps: float | None = None,
    ) -> PreparedInputs:
        chat = as_chat(chat)
        cap = self.frame_cap(model, processor)
        images, videos = collect_media(chat, bounded_frames(num_frames, video_fps, cap), video_fps)
        videos = [cap_frames(v, cap) for v in videos]
        if len(images) == 1:
            images = [self.bounded_image(model, processor, images[0])]
        extra: dict[str, Any] = {}
        image_repl: list[str] = []
        video_repl: list[str] = []
        if images:
            # One conversation: a nested list, so several images select the multi-image layout (as the
            # processor's apply_chat_template does).
            out = processor.image_processor(images=[images], return_tensors="pt")
            extra["pixel_values"] = out["pixel_values"]
            extra["image_sizes"] = out["image_sizes"]
            extra["batch_num_images"] = torch.tensor([len(images)], dtype=torch.long)
            multi = len(images) > 1
            for h, w in out["image_sizes"].tolist():
                n = sum(_segment_length(s) for s in onevision_image_layout(model_config(model), h, w, multi))
                image_repl.append(processor.image_token * n)
        if videos:
            counts = {len(v.frames) for v in videos}
            if len(counts) > 1:
                raise ValueError(
                    f"LLaVA-OneVision needs the same number of frames for every video in a prompt, got {sorted(counts)}; "
                    "sample with num_frames instead of fps"
                )
            extra["pixel_values_videos"] = torch.stack([self.video_pixels(processor, v) for v in videos])
            vc = model_config(model).vision_config
            pooled = math.ceil((vc.image_size // vc.patch_size) / 2) ** 2
            video_repl = [processor.video_token * (len(v.frames) * pooled + 1) for v in videos]

        def encode(c: Chat) -> list[int]:
            text = expand_placeholders(
                render_chat(processor, c), {processor.image_token: image_repl, processor.video_token: video_repl}
            )
            return encode_text(processor, text)

        ids = encode(chat)
        input_ids = torch.tensor([ids], dtype=torch.long)
        inputs = to_model({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}, model)
        modality = self.modality_map(model, inputs)
        remember_map(model, ids, modality)
        return PreparedInputs(
            inputs=inputs,
            modality=modality,
            context_length=context_length_of(encode, chat, ids),
            images=images,
            videos=videos,
        )

    def modality_map(self, model: torch.nn.Module, inputs: dict[str, Any], **kwargs: Any) -> ModalityMap:
        """Image spans from ``image_sizes`` + ``batch_num_images`` + config; video spans from ``pixel_values_videos``."""
        config = model_config(model)
        ids = inputs["input_ids"].reshape(-1).cpu()
        positions = (ids == config.image_token_id).nonzero().reshape(-1).tolist()
        video_positions = (ids == config.video_token_id).nonzero().reshape(-1).tolist()
        missing = (positions and inputs.get("image_sizes") is None) or (
            video_positions and inputs.get("pixel_values_videos") is None
        )
        if missing and (cached := recall_map(model, ids)) is not None:
            return cached
        encoded = inputs.get("mm_encoder_outputs") or {}
        items: list[VisualItem] = []
        cells: list[Cells] = []
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            bni = inputs.get("batch_num_images")
            multi = bni is not None and int(bni.reshape(-1)[0]) > 1
            layouts = [onevision_image_layout(config, h, w, multi) for h, w in sizes.reshape(-1, 2).tolist()]
        else:
            layouts = _onevision_layouts_without_sizes(config, positions, encoder_counts(encoded.get("image")))
        k = 0
        for source, layout in enumerate(layouts):
            for seg in layout:
                n = _segment_length(seg)
                start, _ = _chunks(positions[k:], n, f"image {source} ({seg[0]})")
                items.append(VisualItem(IMAGE, source, 0, seg[0], seg[1], seg[2], start, n))
                cells.append(_segment_cells(seg, start))
                k += n
        if k != len(positions):
            raise ValueError(f"{len(positions) - k} image tokens have no image in image_sizes")
        pvv = inputs.get("pixel_values_videos")
        positions = video_positions
        vc = config.vision_config
        side = math.ceil((vc.image_size // vc.patch_size) / 2)
        if pvv is not None:
            video_frames = [pvv.shape[1]] * pvv.shape[0]
        else:  # tokens per video = frames * side^2 + 1 newline
            counts = encoder_counts(encoded.get("video")) or ([len(positions)] if positions else [])
            video_frames = [(n - 1) // (side * side) for n in counts]
        k = 0
        if video_frames:
            for source, frames in enumerate(video_frames):
                for f in range(frames):
                    last = f == frames - 1
                    n = side * side + (1 if last else 0)
                    start, _ = _chunks(positions[k:], n, f"video {source} frame {f}")
                    item, (pos, r, c) = grid_item(VIDEO, source, f, side, side, start)
                    if last:  # the video's single image_newline token closes its last frame
                        item.length += 1
                        pos, r, c = pos + [start + side * side], r + [-1], c + [-1]
                    items.append(item)
                    cells.append((pos, r, c))
                    k += n
        if k != len(positions):
            raise ValueError(f"{len(positions) - k} video tokens have no video in pixel_values_videos")
        order = sorted(range(len(items)), key=lambda i: items[i].start)
        return ModalityMap.from_items(ids.numel(), [items[i] for i in order], [cells[i] for i in order])
