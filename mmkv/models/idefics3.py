"""Idefics3 (``idefics3``) and SmolVLM (``smolvlm``).

An image is split into ``rows x cols`` tiles plus a downscaled global view. In the prompt every tile is
``<fake_token_around_image><row_i_col_j>`` + ``<image>`` x image_seq_len, rows end with ``\\n``, and the
global view is ``\\n<fake_token_around_image><global-img>`` + ``<image>`` x image_seq_len +
``<fake_token_around_image>``. The markers are TEXT in the ModalityMap; each tile is one item named
``"r{i}c{j}"`` (0-based row/column of the split), ``"global"``, or ``"full"`` for an image that was not
split. Inside a tile the connector's pixel shuffle yields a row-major ``side x side`` grid,
``side = (image_size / patch_size) / scale_factor``.

Video: SmolVLM's video processor needs torchvision, so a video is sampled here and its frames are fed
as unsplit images, in SmolVLM's video prompt format (an intro line, then ``\\nFrame from MM:SS:`` before
each frame, then a blank line). Frames are VIDEO items with ``source`` = video index, ``frame`` = frame index.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, ClassVar

import torch

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
    expand_placeholders,
    frames_for_budget,
    load_processor_without_video,
    recall_map,
    remember_map,
    render_chat,
    set_bounds,
    to_model,
)

__all__ = ["Idefics3Adapter", "SmolVLMAdapter", "video_as_frame_parts"]


def _number_words(n: int) -> str:
    try:
        from num2words import num2words

        return str(num2words(n))
    except ImportError:  # SmolVLM's processor writes the count in words; digits are the fallback
        return str(n)


def _edge(size: Any) -> Any:
    return size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)


def _set_edge(ip: Any, name: str, value: int) -> None:
    size = getattr(ip, name)
    if isinstance(size, dict):
        setattr(ip, name, {**size, "longest_edge": value})
    else:
        import dataclasses

        setattr(ip, name, dataclasses.replace(size, longest_edge=value))


def video_as_frame_parts(video: VideoFrames) -> list[dict[str, Any]]:
    """Chat parts standing for one video in SmolVLM's format: intro text, then per frame a timestamp + image."""
    duration = video.duration if video.duration is not None else (video.timestamps[-1] if video.timestamps else 0.0)
    intro = (
        f"You are provided the following series of {_number_words(len(video.frames))} frames "
        f"from a {timedelta(seconds=int(duration))} [H:MM:SS] video.\n"
    )
    parts: list[dict[str, Any]] = []
    text = intro
    for frame, t in zip(video.frames, video.timestamps):
        text += f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:"
        parts.append({"type": "text", "text": text})
        parts.append({"type": "image", "image": frame})
        text = ""
    parts.append({"type": "text", "text": "\n\n"})
    return parts


class _IdeficsAdapter(ModelAdapter):
    processor_class_name: ClassVar[str]

    def load_processor(self, name_or_path: str, **kwargs: Any) -> Any:
        import transformers

        return load_processor_without_video(getattr(transformers, self.processor_class_name), name_or_path, **kwargs)

    # ------------------------------------------------------------------ prompt strings
    def _tile_string(self, processor: Any, marker: str) -> str:
        return processor.fake_image_token + marker + processor.image_token * processor.image_seq_len

    def _global_tag(self, processor: Any) -> str:
        return getattr(processor, "global_image_token", "") or getattr(processor, "global_image_tag", "<global-img>")

    def image_string(self, processor: Any, rows: int, cols: int) -> str:
        """The expansion of one ``<image>`` placeholder for an image split into ``rows x cols`` tiles."""
        tail = self._tile_string(processor, self._global_tag(processor)) + processor.fake_image_token
        if rows == 0 and cols == 0:
            return tail
        text = ""
        for i in range(rows):
            for j in range(cols):
                text += self._tile_string(processor, f"<row_{i + 1}_col_{j + 1}>")
            text += "\n"
        return text + "\n" + tail

    # ------------------------------------------------------------------ visual token bounds
    def bound_visual_tokens(
        self, model: torch.nn.Module, processor: Any, image_tokens: int | None, video_tokens: int | None
    ) -> str:
        """Images: an image is up to ``n x n`` tiles of ``image_seq_len`` tokens plus a global view, with
        ``n = size["longest_edge"] / max_image_size["longest_edge"]``; ``n`` is lowered so that
        ``(n^2 + 1) x image_seq_len`` fits ``image_tokens`` (below two tiles' worth, splitting is turned off:
        one ``image_seq_len`` view). Videos: frames are unsplit views, so at most
        ``video_tokens // image_seq_len`` frames."""
        bounds = set_bounds(processor, image_tokens, video_tokens)
        ip = processor.image_processor
        tile = int(_edge(ip.max_image_size))
        if not hasattr(processor, "_mmkv_image_size"):
            processor._mmkv_image_size = (_edge(ip.size), bool(getattr(ip, "do_image_splitting", True)))
        longest, split = processor._mmkv_image_size
        seq = int(processor.image_seq_len)
        if bounds.image_tokens is not None:
            n = int(math.isqrt(max(0, bounds.image_tokens // seq - 1)))
            longest = min(int(longest), max(1, n) * tile)
            split = split and n >= 1
        _set_edge(ip, "size", longest)
        ip.do_image_splitting = split
        n = max(1, int(longest) // tile)
        what = (
            f"images up to {(n * n + 1) * seq if split else seq} tokens ({n}x{n} tiles + global)"
            if split
            else (f"images: one {seq}-token view each (no splitting)")
        )
        cap = self.frame_cap(model, processor)
        return what + ("" if cap is None else f"; videos: at most {cap} frames")

    def frame_cap(self, model: torch.nn.Module, processor: Any) -> int | None:
        return frames_for_budget(bounds_of(processor).video_tokens, int(processor.image_seq_len))

    # ------------------------------------------------------------------ prepare
    def _flatten(self, chat: Chat, videos: list[VideoFrames]) -> tuple[Chat, list[tuple[int, int, int]]]:
        out: Chat = []
        sources: list[tuple[int, int, int]] = []
        n_images = n_videos = 0
        for message in chat:
            content: list[dict[str, Any]] = []
            for part in message["content"]:
                if part["type"] == "image":
                    content.append(part)
                    sources.append((IMAGE, n_images, 0))
                    n_images += 1
                elif part["type"] == "video":
                    content.extend(video_as_frame_parts(videos[n_videos]))
                    sources.extend((VIDEO, n_videos, f) for f in range(len(videos[n_videos].frames)))
                    n_videos += 1
                else:
                    content.append(part)
            out.append({"role": message["role"], "content": content})
        return out, sources

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
        _, sources = self._flatten(chat, videos)
        ip = processor.image_processor
        pixels: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        repl: list[str] = []
        done_videos: set[int] = set()
        for modality, source, _frame in sources:
            if modality == IMAGE:
                out = ip(images=[[images[source]]], return_row_col_info=True, return_tensors="pt")
                rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
                repl.append(self.image_string(processor, rows, cols))
            elif source not in done_videos:  # all frames of a video at once, unsplit (one tile each)
                done_videos.add(source)
                out = ip(images=[videos[source].frames], do_image_splitting=False, return_tensors="pt")
                repl.extend(self.image_string(processor, 0, 0) for _ in videos[source].frames)
            else:
                continue
            pixels.append(out["pixel_values"][0])
            masks.append(out["pixel_attention_mask"][0] if "pixel_attention_mask" in out else None)
        extra: dict[str, Any] = {}
        if pixels:
            extra.update(_stack_tiles(pixels, masks))

        def encode(c: Chat) -> list[int]:
            flat, _ = self._flatten(c, videos)
            return encode_text(
                processor, expand_placeholders(render_chat(processor, flat), {processor.image_token: repl})
            )

        ids = encode(chat)
        input_ids = torch.tensor([ids], dtype=torch.long)
        inputs = to_model({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}, model)
        token_map = self.modality_map(model, inputs, processor=processor, sources=sources)
        remember_map(model, ids, token_map)
        return PreparedInputs(
            inputs=inputs,
            modality=token_map,
            context_length=context_length_of(encode, chat, ids),
            images=images,
            videos=videos,
        )

    # ------------------------------------------------------------------ modality map
    def modality_map(self, model: torch.nn.Module, inputs: dict[str, Any], **kwargs: Any) -> ModalityMap:
        """Tiles are chunks of ``image_seq_len`` ``<image>`` tokens; the marker token before each chunk names it.

        ``processor`` names the markers (``<row_i_col_j>`` / ``<global-img>``); without it the global
        marker is taken from the last tile (every image ends with its global view) and split tiles are
        named ``"tile{k}"``. ``sources``: ``(modality, source, frame)`` per image input.
        """
        config = model_config(model)
        if not kwargs.get("sources") and (cached := recall_map(model, inputs["input_ids"])) is not None:
            return cached  # the map prepare() made: it knows tile names and which images are video frames
        vc = config.vision_config
        side = (vc.image_size // vc.patch_size) // config.scale_factor
        per_tile = side * side
        ids = inputs["input_ids"].reshape(-1).cpu()
        positions = (ids == config.image_token_id).nonzero().reshape(-1).tolist()
        if len(positions) % per_tile:
            raise ValueError(f"{len(positions)} image tokens are not a whole number of {per_tile}-token tiles")
        starts = []
        for k in range(0, len(positions), per_tile):
            chunk = positions[k : k + per_tile]
            if chunk[-1] - chunk[0] != per_tile - 1:
                raise ValueError("a tile's image tokens are not contiguous in the prompt")
            starts.append(chunk[0])
        if not starts:
            return ModalityMap.text_only(ids.numel())
        markers = [int(ids[s - 1]) if s > 0 else -1 for s in starts]
        names: dict[int, str] = {}
        processor = kwargs.get("processor")
        if processor is not None:
            tok = processor.tokenizer
            global_id = tok.convert_tokens_to_ids(self._global_tag(processor))
            for i in range(6):
                for j in range(6):
                    names[tok.convert_tokens_to_ids(f"<row_{i + 1}_col_{j + 1}>")] = f"r{i}c{j}"
        else:
            global_id = markers[-1]
        # Group tiles into images: each image ends with its global view.
        groups: list[list[int]] = [[]]
        for t, marker in enumerate(markers):
            groups[-1].append(t)
            if marker == global_id:
                groups.append([])
        if groups[-1]:
            raise ValueError("the last image's tiles are not closed by a global view")
        groups.pop()
        sources = kwargs.get("sources") or [(IMAGE, i, 0) for i in range(len(groups))]
        if len(sources) != len(groups):
            raise ValueError(f"the prompt holds {len(groups)} images but {len(sources)} sources were given")
        items: list[VisualItem] = []
        cells: list[tuple[list[int], list[int], list[int]]] = []
        for (modality, source, frame), group in zip(sources, groups):
            for n, t in enumerate(group):
                if markers[t] == global_id:
                    tile = "full" if len(group) == 1 else "global"
                else:
                    tile = names.get(markers[t], f"tile{n}")
                item, cell = grid_item(modality, source, frame, side, side, starts[t], tile=tile)
                items.append(item)
                cells.append(cell)
        return ModalityMap.from_items(ids.numel(), items, cells)


def _stack_tiles(pixels: list[torch.Tensor], masks: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Concatenate per-image tile stacks ``[n_i, C, H_i, W_i]`` into ``[1, N, C, H, W]`` (zero-padded)."""
    h = max(p.shape[-2] for p in pixels)
    w = max(p.shape[-1] for p in pixels)
    padded, pmasks = [], []
    for p, m in zip(pixels, masks):
        if m is None:
            m = torch.ones(p.shape[0], p.shape[-2], p.shape[-1], dtype=torch.long)
        dh, dw = h - p.shape[-2], w - p.shape[-1]
        if dh or dw:
            p = torch.nn.functional.pad(p, (0, dw, 0, dh))
            m = torch.nn.functional.pad(m, (0, dw, 0, dh))
        padded.append(p)
        pmasks.append(m)
    return {"pixel_values": torch.cat(padded)[None], "pixel_attention_mask": torch.cat(pmasks)[None]}


class Idefics3Adapter(_IdeficsAdapter):
    family = "idefics3"
    model_types = ("idefics3",)
    processor_class_name = "Idefics3Processor"


class SmolVLMAdapter(_IdeficsAdapter):
    family = "smolvlm"
    model_types = ("smolvlm",)
    processor_class_name = "SmolVLMProcessor"
