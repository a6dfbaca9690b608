"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Images go through the processor's image processor. Videos are built here (transformers' video
processors need torchvision), mirroring ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor``: frames
are resized with the family's ``smart_resize`` rule, rescaled and normalised, the frame count is padded
to a multiple of ``temporal_patch_size`` by repeating the last frame, and the frames are cut into
``temporal_patch_size x patch x patch`` patches in the order the vision tower expects. The prompt is
expanded the way the processor would:

- image: ``<|vision_start|>`` + ``<|image_pad|>`` x (t*h*w / merge^2) + ``<|vision_end|>``
- video (2 / 2.5): ``<|video_pad|>`` x (T*h*w / merge^2) between the template's vision markers
- video (3): for each temporal group ``<{t:.1f} seconds><|vision_start|>`` + ``<|video_pad|>`` x (h*w/merge^2)
  + ``<|vision_end|>``, inside the template's own vision markers (transformers 5.x keeps those).

LLM token order inside an image/frame group is row-major over the merged ``(h/merge, w/merge)`` grid.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

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
    load_processor_without_video,
    recall_map,
    remember_map,
    render_chat,
    set_bounds,
    to_model,
)

__all__ = ["Qwen2VLAdapter", "Qwen25VLAdapter", "Qwen3VLAdapter", "qwen_smart_resize", "qwen3_video_resize"]


def qwen_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule: both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is above 200; crop it")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def qwen3_video_resize(
    num_frames: int, height: int, width: int, factor: int, temporal: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen3-VL's video rule: the pixel budget counts all frames (rounded to the temporal patch)."""
    if height < factor or width < factor:
        up = max(factor / height, factor / width)
        height, width = int(height * up), int(width * up)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"video aspect ratio {max(height, width) / min(height, width):.0f} is above 200; crop it")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = max(temporal, round(num_frames / temporal) * temporal)
    if t * h * w > max_pixels:
        scale = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif t * h * w < min_pixels:
        scale = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def _size_get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


class _QwenAdapter(ModelAdapter):
    """Shared Qwen-VL logic; subclasses pick the processor class and the video layout."""

    processor_class_name: ClassVar[str]
    timestamps_in_prompt: ClassVar[bool] = False  # Qwen3-VL writes "<t seconds>" before each frame group
    needs_second_per_grid: ClassVar[bool] = False  # Qwen2.5-VL's temporal M-RoPE spacing

    # ------------------------------------------------------------------ processor
    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        import transformers

        return load_processor_without_video(getattr(transformers, self.processor_class_name), name_or_path, **kwargs)

    def video_config(self, processor: Any) -> dict[str, Any]:
        """Video preprocessing settings: ``processor.video_settings`` over the image processor's."""
        ip = processor.image_processor
        vs = dict(getattr(processor, "video_settings", None) or {})
        size = vs.get("size") or {}
        min_pixels = vs.get("min_pixels", _size_get(size, "shortest_edge"))
        max_pixels = vs.get("max_pixels", _size_get(size, "longest_edge"))
        return {
            "patch_size": int(vs.get("patch_size", ip.patch_size)),
            "merge_size": int(vs.get("merge_size", ip.merge_size)),
            "temporal_patch_size": int(vs.get("temporal_patch_size", ip.temporal_patch_size)),
            "min_pixels": int(min_pixels if min_pixels is not None else _size_get(ip.size, "shortest_edge")),
            "max_pixels": int(max_pixels if max_pixels is not None else _size_get(ip.size, "longest_edge")),
            "image_mean": list(vs.get("image_mean", ip.image_mean)),
            "image_std": list(vs.get("image_std", ip.image_std)),
            "rescale_factor": float(vs.get("rescale_factor", ip.rescale_factor)),
        }

    # ------------------------------------------------------------------ visual token bounds
    def bound_visual_tokens(
        self, model: torch.nn.Module, processor: Any, image_tokens: int | None, video_tokens: int | None
    ) -> str:
        """Images: lower the image processor's ``max_pixels`` (``size["longest_edge"]``) to
        ``image_tokens x (patch x merge)^2``. Videos: :meth:`video_patches` lowers each frame's pixels so
        the whole video fits ``video_tokens`` (Qwen3-VL's video budget already counts all frames), and only
        when even the smallest frames do not fit, keeps fewer frames."""
        bounds = set_bounds(processor, image_tokens, video_tokens)
        ip = processor.image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        if not hasattr(processor, "_mmkv_image_size"):
            processor._mmkv_image_size = (_size_get(ip.size, "shortest_edge"), _size_get(ip.size, "longest_edge"))
        low, high = processor._mmkv_image_size
        if bounds.image_tokens is not None:
            high = min(int(high), bounds.image_tokens * factor * factor)
            low = min(int(low), high)
        _set_size(ip, low, high)
        what = f"images up to {int(high) // factor**2} tokens ({int(high) / 1e6:.2f} MP)"
        if bounds.video_tokens is not None:
            what += f"; videos up to {bounds.video_tokens} tokens (lower resolution first, then fewer frames)"
        return what

    def bounded_video_config(self, cfg: dict[str, Any], processor: Any, num_frames: int) -> dict[str, Any]:
        """``cfg`` with ``max_pixels`` lowered so a video of ``num_frames`` frames fits the video bound."""
        budget = bounds_of(processor).video_tokens
        if budget is None:
            return cfg
        factor = cfg["patch_size"] * cfg["merge_size"]
        tps = cfg["temporal_patch_size"]
        if self.timestamps_in_prompt:  # Qwen3-VL: max_pixels counts every frame
            high = budget * tps * factor * factor
        else:  # Qwen2/2.5-VL: max_pixels is per frame; a temporal group of tps frames is one token grid
            high = budget * factor * factor // max(1, math.ceil(num_frames / tps))
        high = max(factor * factor, min(cfg["max_pixels"], high))
        return {**cfg, "max_pixels": high, "min_pixels": min(cfg["min_pixels"], high)}

    def frame_cap(self, model: torch.nn.Module, processor: Any) -> int | None:
        budget = bounds_of(processor).video_tokens
        if budget is None:
            return None
        cfg = self.video_config(processor)
        if self.timestamps_in_prompt:
            return budget * cfg["temporal_patch_size"]
        factor = cfg["patch_size"] * cfg["merge_size"]
        smallest = max(1, math.ceil(cfg["min_pixels"] / (factor * factor)))  # tokens of the smallest frame group
        return max(1, budget // smallest) * cfg["temporal_patch_size"]

    # ------------------------------------------------------------------ video pixels
    def video_size(self, cfg: dict[str, Any], num_frames: int, height: int, width: int) -> tuple[int, int]:
        factor = cfg["patch_size"] * cfg["merge_size"]
        return qwen_smart_resize(height, width, factor, cfg["min_pixels"], cfg["max_pixels"])

    def video_patches(self, processor: Any, video: VideoFrames) -> tuple[torch.Tensor, list[int]]:
        """``(patches [T/tps*gh*gw, C*tps*p*p], [grid_t, grid_h, grid_w])`` for one sampled video."""
        cfg = self.bounded_video_config(self.video_config(processor), processor, len(video.frames))
        p, m, tps = cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"]
        width, height = video.frames[0].size
        rh, rw = self.video_size(cfg, len(video.frames), height, width)
        frames = [f.convert("RGB") if f.mode != "RGB" else f for f in video.frames]
        arr = np.stack([np.asarray(f.resize((rw, rh), Image.Resampling.BICUBIC), dtype=np.float32) for f in frames])
        arr = arr * cfg["rescale_factor"]
        arr = (arr - np.asarray(cfg["image_mean"], dtype=np.float32)) / np.asarray(cfg["image_std"], dtype=np.float32)
        arr = arr.transpose(0, 3, 1, 2)  # T, C, H, W
        if pad := -arr.shape[0] % tps:
            arr = np.concatenate([arr, np.repeat(arr[-1:], pad, axis=0)], axis=0)
        t, c = arr.shape[0], arr.shape[1]
        gt, gh, gw = t // tps, rh // p, rw // p
        x = arr.reshape(gt, tps, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, gh/m, gw/m, mh, mw, C, tps, ph, pw
        x = np.ascontiguousarray(x).reshape(gt * gh * gw, c * tps * p * p)
        return torch.from_numpy(x), [gt, gh, gw]

    def group_times(self, video: VideoFrames, temporal: int) -> list[float]:
        """Mean timestamp of each temporal patch group (last frame repeated to fill the final group)."""
        ts = list(video.timestamps)
        ts += [ts[-1]] * (-len(ts) % temporal)
        return [(ts[i] + ts[i + temporal - 1]) / 2 for i in range(0, len(ts), temporal)]

    def video_placeholder(self, processor: Any, video: VideoFrames, grid: list[int], merge: int) -> str:
        gt, gh, gw = grid
        pad = processor.video_token
        if not self.timestamps_in_prompt:
            return pad * (gt * gh * gw // merge**2)
        start = getattr(processor, "vision_start_token", "<|vision_start|>")
        end = getattr(processor, "vision_end_token", "<|vision_end|>")
        tps = self.video_config(processor)["temporal_patch_size"]
        times = self.group_times(video, tps)
        return "".join(f"<{times[g]:.1f} seconds>" + start + pad * (gh * gw // merge**2) + end for g in range(gt))

    # ------------------------------------------------------------------ prepare
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
        merge = int(processor.image_processor.merge_size)
        extra: dict[str, Any] = {}
        image_repl: list[str] = []
        video_repl: list[str] = []
        if images:
            out = processor.image_processor(images=images, return_tensors="pt")
            extra["pixel_values"] = out["pixel_values"]
            extra["image_grid_thw"] = out["image_grid_thw"]
            image_repl = [processor.image_token * (int(g.prod()) // merge**2) for g in out["image_grid_thw"]]
        if videos:
            patches, grids = zip(*(self.video_patches(processor, v) for v in videos))
            vmerge = self.video_config(processor)["merge_size"]
            extra["pixel_values_videos"] = torch.cat(patches, dim=0)
            extra["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            video_repl = [self.video_placeholder(processor, v, g, vmerge) for v, g in zip(videos, grids)]
            if self.needs_second_per_grid:
                tps = self.video_config(processor)["temporal_patch_size"]
                extra["second_per_grid_ts"] = torch.tensor([tps / v.fps for v in videos], dtype=torch.float32)

        def encode(c: Chat) -> list[int]:
            text = render_chat(processor, c)
            text = expand_placeholders(text, {processor.image_token: image_repl, processor.video_token: video_repl})
            return encode_text(processor, text)

        ids = encode(chat)
        input_ids = torch.tensor([ids], dtype=torch.long)
        types = torch.zeros_like(input_ids)
        types[input_ids == processor.image_token_id] = 1
        types[input_ids == processor.video_token_id] = 2
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": types}
        inputs.update(extra)
        inputs = to_model(inputs, model)
        modality = self.modality_map(model, inputs)
        remember_map(model, ids, modality)
        return PreparedInputs(
            inputs=inputs,
            modality=modality,
            context_length=context_length_of(encode, chat, ids),
            images=images,
            videos=videos,
        )

    # ------------------------------------------------------------------ continuing a kept cache
    def media_suffix(self, prepared: PreparedInputs, images: int, videos: int) -> dict[str, Any]:
        """Patch rows of the last images / videos: ``prod(grid_thw)`` rows each, in chat order."""
        inputs, out = prepared.inputs, {}
        for count, pixels, grid in (
            (images, "pixel_values", "image_grid_thw"),
            (videos, "pixel_values_videos", "video_grid_thw"),
        ):
            if count:
                grids = inputs[grid][-count:]
                out[pixels] = inputs[pixels][-int(grids.prod(-1).sum()) :]
                out[grid] = grids
        if videos and "second_per_grid_ts" in inputs:
            out["second_per_grid_ts"] = inputs["second_per_grid_ts"][-videos:]
        return out

    def suffix_position_ids(self, model: torch.nn.Module, prepared: PreparedInputs, start: int) -> torch.Tensor | None:
        """M-RoPE ids of the whole conversation (the model's own ``compute_3d_position_ids`` on a fresh read),
        cut at ``start``; the model keeps the conversation's ``rope_deltas`` for the decode steps after."""
        import inspect

        inner: Any = getattr(model, "model", model)
        inner.rope_deltas = None
        inputs = prepared.inputs
        accepted = inspect.signature(inner.compute_3d_position_ids).parameters
        call = {name: inputs.get(name) for name in accepted if name not in ("self", "kwargs")}  # past_key_values: None
        position_ids = inner.compute_3d_position_ids(**call)
        if position_ids is None:  # a text-only conversation: positions are the token indices
            inner.rope_deltas = torch.zeros(1, 1, dtype=torch.long, device=inputs["input_ids"].device)
            return None
        return position_ids[..., start:]

    # ------------------------------------------------------------------ modality map
    def modality_map(self, model: torch.nn.Module, inputs: dict[str, Any], **kwargs: Any) -> ModalityMap:
        """Items from ``mm_token_type_ids`` (or the config's pad ids) and ``image_grid_thw``/``video_grid_thw``.

        One item per image and per temporal group of a video (``frame`` = group index). Without the grids
        (a forward call made by transformers' ``generate``, which passes ``mm_encoder_outputs`` instead):
        the map :meth:`prepare` made for the same ids, else tokens per image/video from the encoder
        outputs and each group's grid from the M-RoPE ``position_ids``.
        """
        ids = inputs["input_ids"].reshape(-1).cpu()
        has_grids = all(
            inputs.get(key) is not None or not bool((ids == tid).any())
            for key, tid in (
                ("image_grid_thw", model_config(model).image_token_id),
                ("video_grid_thw", model_config(model).video_token_id),
            )
        )
        if not has_grids and (cached := recall_map(model, ids)) is not None:
            return cached
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = torch.zeros_like(ids)
            types[ids == model_config(model).image_token_id] = 1
            types[ids == model_config(model).video_token_id] = 2
        types = types.reshape(-1).cpu()
        merge = int(model_config(model).vision_config.spatial_merge_size)
        pos3 = _mrope_positions(inputs.get("position_ids"), ids.numel())
        encoded = inputs.get("mm_encoder_outputs") or {}
        found: list[tuple[VisualItem, tuple[list[int], list[int], list[int]]]] = []
        for modality, key, kind in ((IMAGE, "image_grid_thw", "image"), (VIDEO, "video_grid_thw", "video")):
            positions = (types == modality).nonzero().reshape(-1).tolist()
            grids = inputs.get(key)
            if grids is not None:
                layout = [(t, h // merge, w // merge) for t, h, w in grids.reshape(-1, 3).tolist()]
            else:
                layout = _layout_without_grids(positions, encoder_counts(encoded.get(kind)), pos3)
            k = 0
            for source, (t, rows, cols) in enumerate(layout):
                n = rows * cols
                for group in range(t):
                    chunk = positions[k : k + n]
                    if len(chunk) != n or chunk[-1] - chunk[0] != n - 1:
                        raise ValueError(
                            f"{kind} {source}: the prompt's placeholder tokens do not match its grid "
                            f"({t} x {rows} x {cols} merged; expected {n} contiguous tokens per group)"
                        )
                    found.append(grid_item(modality, source, group, rows, cols, chunk[0]))
                    k += n
            if k != len(positions):
                raise ValueError(f"{len(positions) - k} {kind} placeholder tokens have no {key} entry")
        found.sort(key=lambda pair: pair[0].start)
        return ModalityMap.from_items(ids.numel(), [f[0] for f in found], [f[1] for f in found])


def _mrope_positions(position_ids: Any, length: int) -> torch.Tensor | None:
    """``[3, L]`` (temporal, height, width) M-RoPE positions from ``position_ids`` of shape (3|4, 1, L)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 3 or position_ids.shape[0] < 3:
        return None
    if position_ids.shape[-1] != length:
        return None
    return position_ids[-3:, 0].cpu()


def _layout_without_grids(
    positions: list[int], counts: list[int] | None, pos3: torch.Tensor | None
) -> list[tuple[int, int, int]]:
    """``(groups, rows, cols)`` per image/video when the processor's grids are not at hand."""
    if counts is None:  # one source per contiguous run of placeholders
        counts = []
        for i, p in enumerate(positions):
            if i == 0 or p != positions[i - 1] + 1:
                counts.append(0)
            counts[-1] += 1
    layout = []
    k = 0
    for n in counts:
        chunk = positions[k : k + n]
        k += n
        run = [chunk[0]]
        for p in chunk[1:]:
            if p != run[-1] + 1:
                break
            run.append(p)
        rows, cols = 1, len(run)
        if pos3 is not None:
            h, w = pos3[1, run], pos3[2, run]
            r, c = int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1
            if r * c and len(run) % (r * c) == 0:
                rows, cols = r, c
        if n % (rows * cols):
            rows, cols = 1, n
        layout.append((n // (rows * cols), rows, cols))
    return layout


def _set_size(ip: Any, shortest: Any, longest: Any) -> None:
    """Set a Qwen image processor's pixel range (``size`` is a dict or a ``SizeDict``)."""
    size = ip.size
    if isinstance(size, dict):
        ip.size = {**size, "shortest_edge": shortest, "longest_edge": longest}
    else:
        import dataclasses

        ip.size = dataclasses.replace(size, shortest_edge=shortest, longest_edge=longest)
    for name, value in (("min_pixels", shortest), ("max_pixels", longest)):
        if getattr(ip, name, None) is not None:
            setattr(ip, name, value)


class Qwen2VLAdapter(_QwenAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    processor_class_name = "Qwen2VLProcessor"


class Qwen25VLAdapter(_QwenAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    processor_class_name = "Qwen2_5_VLProcessor"
    needs_second_per_grid = True


class Qwen3VLAdapter(_QwenAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    processor_class_name = "Qwen3VLProcessor"
    timestamps_in_prompt = True

    def video_size(self, cfg: dict[str, Any], num_frames: int, height: int, width: int) -> tuple[int, int]:
        factor = cfg["patch_size"] * cfg["merge_size"]
        return qwen3_video_resize(
            num_frames, height, width, factor, cfg["temporal_patch_size"], cfg["min_pixels"], cfg["max_pixels"]
        )
