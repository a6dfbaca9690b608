"""Train the bundled teaching VLM on the synthetic tasks: ``python -m training.tiny.train --out DIR --steps N``.

Recipe (from ``research/tiny_vlm_probe.md`` and this project's runs): fresh synthetic episodes every
step, several QA turns per image set / video, loss on the answer tokens (and their ``<|im_end|>``), a
curriculum over the number of images K (``--k-start`` for ``--k-hold`` steps, then ramped to
``--k-max``), LR with warmup (constant, then a linear decay over the last ``--decay`` fraction), and
auxiliary losses on probes dropped at export (:class:`AuxHeads`): per-cell colour/shape on the vision
merger, video motion, the image-index binding of visual tokens, and (``--retrieval-weight``) the
attention of two layer-2 heads from the decisive answer token to the image / frames it is read from.
Stages chain with ``--init`` (``scripts/train_tiny.sh`` is the bundled model's chain).

Seeded and resumable: the work dir (default ``.cache/tiny-train``) holds ``ckpt.pt`` (model, aux head,
optimizer, step) and ``log.jsonl``; running the same command again continues from the checkpoint
(``--steps`` may be raised). Held-out accuracy is greedy exact match, computed teacher-forced (every
answer token and the closing ``<|im_end|>`` must be the argmax, which is exactly when greedy decoding
reproduces the answer). Uses CUDA when present.

Inputs are encoded directly (token ids from cached text pieces, pixels patchified in numpy) instead of
through the processor; ``tests/test_tiny_tasks.py`` checks that both give identical tensors. Videos go
through :meth:`mmkv.models.qwen_vl.Qwen2VLAdapter.video_patches`, the app's own code path.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmkv.tiny.tasks import (
    ALL_TASKS,
    COLOUR_NAMES,
    DIRECTIONS,
    MAX_IMAGES,
    NUM_FRAMES,
    SHAPES,
    TASKS,
    V2_SIZES,
    V2_TASKS,
    Episode,
    cell_labels,
    heldout_set,
    make_episode,
    video_direction,
)

__all__ = ["FastEncoder", "TeacherForcedEval", "main"]

IGNORE = -100
SHIP_AT = 0.95


class FastEncoder:
    """Episodes -> a padded training batch, identical to the processor path (see the tests)."""

    def __init__(self, processor: Any) -> None:
        from mmkv.models.qwen_vl import Qwen2VLAdapter

        self.processor = processor
        self.tok = processor.tokenizer
        self.adapter = Qwen2VLAdapter()
        ip = processor.image_processor
        self.merge = int(ip.merge_size)
        self.patch = int(ip.patch_size)
        self.tps = int(ip.temporal_patch_size)
        self.mean = np.asarray(ip.image_mean, dtype=np.float32)
        self.std = np.asarray(ip.image_std, dtype=np.float32)
        self.rescale = float(ip.rescale_factor)
        self.ids = {
            s: self.tok.convert_tokens_to_ids(s)
            for s in (
                "<|im_start|>",
                "<|im_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|image_pad|>",
                "<|video_pad|>",
            )
        }
        self.pad_id = self.tok.pad_token_id
        self._cache: dict[str, list[int]] = {}
        # v2: spot_difference answers get a retrieval target (the changed cells of both pictures) when set
        self.spot_retrieval = False
        self._spot_cells: np.ndarray | None = None

    def text(self, s: str) -> list[int]:
        ids = self._cache.get(s)
        if ids is None:
            ids = list(self.tok(s, add_special_tokens=False)["input_ids"])
            self._cache[s] = ids
        return ids

    # -------------------------------------------------------------- pixels
    def image_patches(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[list[int]]]:
        """Patches of RGB images, laid out as ``Qwen2VLImageProcessor`` does (runs of same-size images at once)."""
        runs: list[list[Any]] = []
        for im in images:
            if runs and runs[-1][0].size == im.size:
                runs[-1].append(im)
            else:
                runs.append([im])
        if len(runs) > 1:
            parts = [self._same_size_patches(r) for r in runs]
            return torch.cat([p for p, _ in parts]), [g for _, grids in parts for g in grids]
        return self._same_size_patches(images)

    def _same_size_patches(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[list[int]]]:
        # same rounding as the PIL image processor: rescale in float64, normalise in float32
        arr: np.ndarray = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # N, H, W, C
        arr = (arr.astype(np.float64) * self.rescale).astype(np.float32)
        arr = (arr - self.mean) / self.std
        arr = arr.transpose(0, 3, 1, 2)  # N, C, H, W
        n, c, h, w = arr.shape
        p, m, tps = self.patch, self.merge, self.tps
        gh, gw = h // p, w // p
        x = np.repeat(arr[:, None], tps, axis=1)  # N, tps, C, H, W (a still image fills the temporal patch)
        x = x.reshape(n, tps, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        x = np.ascontiguousarray(x).reshape(n * gh * gw, c * tps * p * p)
        return torch.from_numpy(x), [[1, gh, gw]] * n

    # -------------------------------------------------------------- tokens
    def _vision(self, pad: str, count: int) -> list[int]:
        return [self.ids["<|vision_start|>"]] + [self.ids[pad]] * count + [self.ids["<|vision_end|>"]]

    def episode_ids(
        self, ep: Episode, tokens_per_item: Sequence[int], answer_last: bool = True
    ) -> tuple[list[int], list[int], list[tuple[int, list[int]]]]:
        """``(ids, labels, targets)`` of the whole episode; labels mark each answer and its ``<|im_end|>``.

        With ``answer_last=False`` the ids stop after the last turn's ``<|im_start|>assistant\\n``
        (the prompt the processor builds for generation) and carry no label for the last answer.
        ``targets``: per answer with a single visual source, ``(position of the token that predicts the decisive
        word, positions of the visual tokens it is read from)`` (see :meth:`retrieval_targets`).
        """
        ids: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, int]] = []  # token range of each visual item
        targets: list[tuple[int, list[int]]] = []
        start, end = self.ids["<|im_start|>"], self.ids["<|im_end|>"]
        nl = self.text("\n")

        def add(seq: list[int], learn: bool = False) -> None:
            ids.extend(seq)
            labels.extend(seq if learn else [IGNORE] * len(seq))

        item = 0
        for i, (task, q, a) in enumerate(ep.turns):
            add([start] + self.text("user") + nl)
            if i == 0:
                for part in ep.context_parts():
                    if part["type"] == "text":
                        add(self.text(part["text"]))
                    else:
                        if part["type"] == "image":  # the chat template's label (see mmkv.tiny.tokenizer.CHAT_TEMPLATE)
                            add(self.text(f"Image {item + 1}:"))
                        first = len(ids) + 1  # after <|vision_start|>
                        add(
                            self._vision(
                                "<|image_pad|>" if part["type"] == "image" else "<|video_pad|>", tokens_per_item[item]
                            )
                        )
                        spans.append((first, first + tokens_per_item[item]))
                        item += 1
            add(self.text(q))
            add([end] + nl + [start] + self.text("assistant") + nl)
            last = i == len(ep.turns) - 1
            if last and not answer_last:
                break
            target = self.retrieval_targets(task, a, spans)
            if target is not None:
                targets.append((len(ids) + target[0], target[1]))
            add(self.text(a) + [end], learn=True)
            if not last:
                add(nl)
        self._spans = spans
        return ids, labels, targets

    def retrieval_targets(
        self, task: str, answer: str, spans: Sequence[tuple[int, int]]
    ) -> tuple[int, list[int]] | None:
        """Where an answer's decisive token is read from: ``(offset in the answer of the token that predicts
        it, positions of the visual tokens that hold it)``.

        ``needle``: the image index is read from the named image's tokens; ``colour_at``: the colour from
        image k's tokens; ``video_colour``: the colour from the first or last temporal group of the video.
        Other tasks have no single visual source (``text_needle`` reads text, ``video_direction`` the
        whole track) and return None.
        """
        words = answer.rstrip(".").split()
        if task == "needle":  # "The red circle is in image 3."
            item, decisive = int(words[-1]) - 1, len(words) - 1
            pos = list(range(*spans[item]))
        elif task == "colour_at":  # "The square in image 2 is blue."
            item, decisive = int(words[4]) - 1, len(words) - 1
            pos = list(range(*spans[item]))
        elif (
            task == "spot_difference"
            and self.spot_retrieval
            and self._spot_cells is not None
            and self._spot_cells.any()
        ):
            # "The orange square moved." / "An orange square appeared.": the colour word is read from the cells
            # that differ between the two pictures (in both of them)
            cells = np.nonzero(self._spot_cells)[0]
            pos, decisive = [spans[i][0] + int(c) for i in range(2) for c in cells], 1
        elif task == "video_colour":  # "The ball is red in the last frame."
            groups = NUM_FRAMES // self.tps
            lo, hi = spans[0]
            size = (hi - lo) // groups
            g = 0 if words[-2] == "first" else groups - 1
            pos, decisive = list(range(lo + g * size, lo + (g + 1) * size)), 3
        else:
            return None
        return len(self.text(" ".join(words[:decisive]))) - 1, pos

    # -------------------------------------------------------------- batch
    def encode(self, episodes: Sequence[Episode], answer_last: bool = True, aux: bool = True) -> dict[str, Any]:
        images: list[Any] = []
        videos: list[Any] = []
        image_labels: list[Any] = []
        video_labels: list[Any] = []
        bind, motion = [], []
        diff: list[
            np.ndarray
        ] = []  # per visual token: the cell differs in the other picture (spot_difference scenes), else -100
        presence: list[
            tuple[int, int, list[float]]
        ] = []  # (row, position of an image's <|vision_end|>, colours present)
        retrieval: list[tuple[int, int, list[int]]] = []
        rows: list[Any] = []
        for ep in episodes:
            media, labs = ep.media()
            if ep.is_video:
                frames = self.adapter_frames(ep)
                patches, grid = self.adapter.video_patches(self.processor, frames)
                videos.append((patches, grid))
                gt, gh, gw = grid
                per = [gt * gh * gw // self.merge**2]
                if aux:
                    diff.append(np.full(per[0], IGNORE))
                    direction = 1 + DIRECTIONS.index(video_direction(ep.scene))
                    for g in range(gt):
                        colour, shape = cell_labels(labs[g * self.tps : (g + 1) * self.tps])
                        video_labels.append((colour, shape))
                        motion.append(np.where(shape == 1 + SHAPES.index("circle"), direction, 0))
                        bind.append(np.full(per[0] // gt, g))
            else:
                images.extend(media)
                per = [
                    (m.size[0] // (self.patch * self.merge)) * (m.size[1] // (self.patch * self.merge)) for m in media
                ]
                if aux:
                    cells = [cell_labels([lab]) for lab in labs]
                    image_labels.extend(cells)
                    bind.extend(np.full(n, k) for k, n in enumerate(per))
                    if len(cells) == 2 and ep.turns and ep.turns[0][0] == "spot_difference" and per[0] == per[1]:
                        changed = ((cells[0][0] != cells[1][0]) | (cells[0][1] != cells[1][1])).astype(np.int64)
                        diff.extend([changed, changed])
                        self._spot_cells = changed
                    else:
                        diff.extend(np.full(n, IGNORE) for n in per)
            ids, answer_labels, targets = self.episode_ids(ep, per, answer_last)
            self._spot_cells = None
            if aux and not ep.is_video:
                for (_, end), objs in zip(self._spans, ep.scene.images):
                    present = {o.colour for o in objs}
                    presence.append((len(rows), end, [float(c in present) for c in COLOUR_NAMES]))
            rows.append((ids, answer_labels))
            retrieval.extend((len(rows) - 1, q, pos) for q, pos in targets)
        length = max(len(r[0]) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        attn = torch.zeros((b, length), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attn[i, : len(ids)] = 1
        types = torch.zeros_like(input_ids)
        types[input_ids == self.ids["<|image_pad|>"]] = 1
        types[input_ids == self.ids["<|video_pad|>"]] = 2
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attn,
            "mm_token_type_ids": types,
            "labels": labels,
        }
        if images:
            pv, grids = self.image_patches(images)
            out["pixel_values"] = pv
            out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        if videos:
            out["pixel_values_videos"] = torch.cat([v[0] for v in videos])
            out["video_grid_thw"] = torch.tensor([v[1] for v in videos], dtype=torch.long)
        if aux:
            for key, labs in (("image", image_labels), ("video", video_labels)):
                if labs:
                    out[f"{key}_aux_colour"] = torch.from_numpy(np.concatenate([c for c, _ in labs])).long()
                    out[f"{key}_aux_shape"] = torch.from_numpy(np.concatenate([s for _, s in labs])).long()
            if bind:  # visual tokens in sequence order (images and videos never share an episode)
                out["aux_bind"] = torch.from_numpy(np.concatenate(bind)).long()
            if motion:
                out["video_aux_motion"] = torch.from_numpy(np.concatenate(motion)).long()
            if diff and any((d >= 0).any() for d in diff):
                out["aux_diff"] = torch.from_numpy(np.concatenate(diff)).long()
            if presence:
                out["presence_row"] = torch.tensor([r for r, _, _ in presence])
                out["presence_pos"] = torch.tensor([p for _, p, _ in presence])
                out["aux_presence"] = torch.tensor([v for _, _, v in presence])
            if retrieval:
                out["retrieval_row"] = torch.tensor([r for r, _, _ in retrieval])
                out["retrieval_query"] = torch.tensor([q for _, q, _ in retrieval])
                mask = torch.zeros((len(retrieval), length), dtype=torch.bool)
                for i, (_, _, pos) in enumerate(retrieval):
                    mask[i, pos] = True
                out["retrieval_mask"] = mask
        return out

    def adapter_frames(self, ep: Episode) -> Any:
        from mmkv.inputs.video import as_video_frames

        part = ep.context_parts()[0]
        return as_video_frames(part["video"], num_frames=None, fps=part.get("fps"))


# ------------------------------------------------------------------------------------------------
# Model step
# ------------------------------------------------------------------------------------------------


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class AuxHeads(torch.nn.Module):
    """Linear probes trained alongside the model and dropped at export.

    ``cells``: each merged visual token's colour and shape (on the vision merger's output);
    ``motion``: for video tokens, the ball's direction on cells the ball covers, 0 elsewhere (the
    temporal patch stacks two frames, so a token can see the motion locally);
    ``bind``: on the text model's hidden state after ``bind_layer`` layers, each visual token's image index
    within the prompt (its temporal group for a video) -- the binding that "which image" answers read.
    ``retrieval`` (no parameters): the attention of ``retrieval_heads`` in text layer ``retrieval_layer``,
    from the token that predicts an answer's decisive word, should fall on the visual tokens the word is
    read from (loss ``-log`` of that attention mass, averaged over the heads). The default heads 0 and 1
    share KV head 0 of the tiny model, so one KV head learns to retrieve and the other stays free.
    """

    def __init__(
        self, hidden: int, bind_layer: int, retrieval_layer: int | None = 2, retrieval_heads: Sequence[int] = (0, 1)
    ) -> None:
        super().__init__()
        self.retrieval_layer = retrieval_layer
        self.retrieval_heads = list(retrieval_heads)
        self.retrieval_on = False  # needs eager attention (attention weights); set by the trainer
        self.hooked = False  # True: recompute the retrieval layer's attention from its input (the rest stays sdpa)
        self.cells = torch.nn.Linear(hidden, len(COLOUR_NAMES) + 1 + len(SHAPES) + 1)
        self.motion = torch.nn.Linear(hidden, len(DIRECTIONS) + 1)
        self.bind = torch.nn.Linear(hidden, MAX_IMAGES)
        self.bind_layer = bind_layer
        self.diff_layer: int | None = None
        self.presence_layer: int | None = None

    def add_v2_probes(self, hidden: int, diff_layer: int | None, presence_layer: int | None) -> None:
        """v2's probes (created only when used, so runs without them keep their checkpoints' shapes):
        ``diff``: on the hidden state after ``diff_layer`` layers, whether each visual token's cell differs from
        the same cell of the other picture (spot_difference scenes; the comparison the answer needs);
        ``presence``: at each image's ``<|vision_end|>`` token after ``presence_layer`` layers, which colours the
        image holds (a per-image summary that counting reads)."""
        if diff_layer is not None:
            self.diff = torch.nn.Linear(hidden, 2)
            self.diff_layer = diff_layer
        self.diff_class_weight = torch.tensor([1.0, 1.0])
        if presence_layer is not None:
            self.presence = torch.nn.Linear(hidden, len(COLOUR_NAMES))
            self.presence_layer = presence_layer


def _heads_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints from before :class:`AuxHeads` held only the cell probe, as a bare Linear."""
    return state if any(k.startswith("cells.") for k in state) else {f"cells.{k}": v for k, v in state.items()}


def _probe(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        acc = float((logits.argmax(-1) == target).float().mean())
    return F.cross_entropy(logits, target), acc


def forward(model: Any, heads: AuxHeads | None, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Answer-token logits and the auxiliary losses (``aux_loss`` (cells), ``motion_loss``, ``bind_loss``; 0 without ``heads``)."""
    inner = model.model
    enc: dict[str, Any] = {}
    aux_loss = torch.zeros((), device=batch["input_ids"].device)
    bind_loss = torch.zeros((), device=batch["input_ids"].device)
    motion_loss = torch.zeros((), device=batch["input_ids"].device)
    retrieval_loss = torch.zeros((), device=batch["input_ids"].device)
    diff_loss = torch.zeros((), device=batch["input_ids"].device)
    presence_loss = torch.zeros((), device=batch["input_ids"].device)
    stats: dict[str, Any] = {}
    for key, pix, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if batch.get(pix) is None:
            continue
        fn = inner.get_image_features if key == "image" else inner.get_video_features
        out = fn(batch[pix], batch[grid], return_dict=True)
        enc[key] = out
        if heads is not None and f"{key}_aux_colour" in batch:
            feats = torch.cat(out.pooler_output, dim=0)
            logits = heads.cells(feats)
            nc = len(COLOUR_NAMES) + 1
            lc = F.cross_entropy(logits[:, :nc], batch[f"{key}_aux_colour"])
            ls = F.cross_entropy(logits[:, nc:], batch[f"{key}_aux_shape"])
            aux_loss = aux_loss + lc + ls
            with torch.no_grad():
                ok = (logits[:, :nc].argmax(-1) == batch[f"{key}_aux_colour"]) & (
                    logits[:, nc:].argmax(-1) == batch[f"{key}_aux_shape"]
                )
                stats[f"aux_acc_{key}"] = float(ok.float().mean())
            if key == "video" and "video_aux_motion" in batch:
                motion_loss, stats["aux_acc_motion"] = _probe(heads.motion(feats), batch["video_aux_motion"])
    captured: dict[str, Any] = {}
    hook = None
    retrieval_heads = heads if heads is not None and heads.retrieval_on and "retrieval_mask" in batch else None
    if retrieval_heads is not None and retrieval_heads.hooked:
        attn_module = model.model.language_model.layers[retrieval_heads.retrieval_layer].self_attn

        def grab(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["rope"] = kwargs["position_embeddings"]

        hook = attn_module.register_forward_pre_hook(grab, with_kwargs=True)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        mm_encoder_outputs=enc or None,
        use_cache=False,
        output_hidden_states=heads is not None and ("aux_bind" in batch or "aux_presence" in batch),
        output_attentions=retrieval_heads is not None and not retrieval_heads.hooked,
    )
    if hook is not None:
        hook.remove()
    if retrieval_heads is not None:
        rows, queries = batch["retrieval_row"], batch["retrieval_query"]
        if retrieval_heads.hooked:
            probs = retrieval_attention(
                model.model.language_model.layers[retrieval_heads.retrieval_layer].self_attn,
                captured["hidden"],
                captured["rope"],
                rows,
                queries,
                retrieval_heads.retrieval_heads,
            )
        else:
            attn = out.attentions[retrieval_heads.retrieval_layer]  # [B, H, L, L]
            probs = attn[rows, :, queries, :][:, retrieval_heads.retrieval_heads]  # [n, heads, L]
        mass = (probs * batch["retrieval_mask"][:, None, :]).sum(-1)
        retrieval_loss = -torch.log(mass.clamp_min(1e-6)).mean()
        stats["retrieval_mass"] = float(mass.detach().mean())
    if heads is not None and "aux_bind" in batch:
        ids = batch["input_ids"]
        visual = (batch["mm_token_type_ids"] > 0) & (batch["attention_mask"] > 0)
        hidden = out.hidden_states[heads.bind_layer][visual]
        bind_loss, stats["aux_acc_bind"] = _probe(heads.bind(hidden), batch["aux_bind"].to(ids.device))
        if heads.diff_layer is not None and "aux_diff" in batch:
            target = batch["aux_diff"].to(ids.device)
            keep = target >= 0
            logits = heads.diff(out.hidden_states[heads.diff_layer][visual][keep])
            diff_loss = F.cross_entropy(logits, target[keep], weight=heads.diff_class_weight.to(logits.device))
            with torch.no_grad():  # accuracy on the changed cells (most cells are unchanged)
                on = target[keep] == 1
                stats["aux_acc_diff"] = float((logits.argmax(-1)[on] == 1).float().mean()) if bool(on.any()) else 1.0
    if heads is not None and heads.presence_layer is not None and "aux_presence" in batch:
        h = out.hidden_states[heads.presence_layer][batch["presence_row"], batch["presence_pos"]]
        logits = heads.presence(h)
        target = batch["aux_presence"].to(logits.device)
        presence_loss = F.binary_cross_entropy_with_logits(logits, target)
        with torch.no_grad():
            stats["aux_acc_presence"] = float(((logits > 0).float() == target).all(-1).float().mean())
    return out.logits, {
        "aux_loss": aux_loss,
        "bind_loss": bind_loss,
        "motion_loss": motion_loss,
        "retrieval_loss": retrieval_loss,
        "diff_loss": diff_loss,
        "presence_loss": presence_loss,
        **stats,
    }


def retrieval_attention(
    attn: Any,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    queries: torch.Tensor,
    head_ids: Sequence[int],
) -> torch.Tensor:
    """The attention probabilities of query heads ``head_ids`` of ``attn`` (a text layer's self-attention) from
    token ``queries[i]`` of row ``rows[i]`` over that row's tokens, as eager attention computes them (causal; rows
    are right-padded, so a query sees only real tokens), recomputed from the layer's input ``hidden`` and M-RoPE
    ``rope`` for just those rows -- the rest of the model keeps sdpa. Shape ``[n, len(head_ids), L]``."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    hd = attn.head_dim
    groups = attn.num_key_value_groups
    cos, sin = rope
    h = hidden[rows]  # [n, L, D]
    n, length, _ = h.shape
    q = attn.q_proj(h[torch.arange(n), queries])  # [n, H * hd]
    q = q.view(n, -1, hd)[:, list(head_ids)]  # [n, h, hd]
    kv_ids = sorted({i // groups for i in head_ids})
    k = attn.k_proj(h).view(n, length, -1, hd)[:, :, kv_ids]  # [n, L, kv, hd]
    c, si = cos[rows], sin[rows]  # [n, L, hd]
    cq, sq = c[torch.arange(n), queries][:, None], si[torch.arange(n), queries][:, None]
    q = q * cq + rotate_half(q) * sq
    k = k * c[:, :, None] + rotate_half(k) * si[:, :, None]
    k = k[:, :, [kv_ids.index(i // groups) for i in head_ids]]  # [n, L, h, hd]
    scores = torch.einsum("nhd,nlhd->nhl", q, k) * attn.scaling
    causal = torch.arange(length, device=h.device)[None, :] <= queries[:, None]  # [n, L]
    scores = scores.masked_fill(~causal[:, None, :], float("-inf"))
    return torch.softmax(scores.float(), dim=-1)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE
    )


class TeacherForcedEval:
    """Per-task held-out accuracy: exact match of every answer token (= greedy decoding's answer)."""

    def __init__(
        self,
        encoder: FastEncoder,
        n: int,
        suites: Sequence[tuple[str, int | None]],
        batch: int = 32,
        sizes: dict[str, int] | None = None,
    ) -> None:
        self.encoder = encoder
        self.batch = batch
        sizes = sizes or {}
        self.suites = [
            (task, k, [s.episode() for s in heldout_set(task, n, k, size=sizes.get(task))]) for task, k in suites
        ]

    @torch.no_grad()
    def __call__(self, model: Any, device: torch.device) -> dict[str, float]:
        was = model.training
        model.eval()
        res: dict[str, float] = {}
        for task, k, eps in self.suites:
            ok = 0
            for i in range(0, len(eps), self.batch):
                batch = _to(self.encoder.encode(eps[i : i + self.batch], aux=False), device)
                logits, _ = forward(model, None, batch)
                pred = logits[:, :-1].argmax(-1)
                lab = batch["labels"][:, 1:]
                mask = lab != IGNORE
                ok += int(((pred == lab) | ~mask).all(dim=1).sum())
            res[task if k is None else f"{task}@{k}"] = ok / len(eps)
        model.train(was)
        return res


EVAL_SUITES = (
    ("needle", 4),
    ("needle", 8),
    ("colour_at", 4),
    ("colour_at", 8),
    ("text_needle", 8),
    ("video_direction", None),
    ("video_colour", None),
)
# v2 (docs/tiny-v2.md): the tasks at their hardest settings, plus 4-image points for the curves
EVAL_SUITES_V2 = (
    ("needle", 4),
    ("needle", 8),
    ("text_needle", 8),
    ("spot_difference", None),
    ("count", 4),
    ("count", 8),
    ("video_direction", None),
    ("video_colour", None),
)


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    decay_start = int(args.steps * (1 - args.decay))
    if step < decay_start:
        return args.lr
    frac = (step - decay_start) / max(1, args.steps - decay_start)
    return args.lr * (1 - 0.9 * min(1.0, frac))


def k_max_at(step: int, args: argparse.Namespace) -> int:
    if step < args.k_hold:
        return args.k_start
    frac = (step - args.k_hold) / max(1, args.k_ramp)
    return min(args.k_max, args.k_start + int(frac * (args.k_max - args.k_start + 1)))


def batch_episodes(step: int, args: argparse.Namespace, weights: dict[str, float]) -> list[Episode]:
    rng = random.Random(f"mmkv-tiny-train/{args.seed}/{step}")
    kmax = k_max_at(step, args)
    out = []
    if args.arch == "v2":  # scene kinds: video, two-picture (spot_difference), count scene, v1 image scene
        for _ in range(args.batch):
            u = rng.random()
            if u < args.video_frac:
                out.append(make_episode(rng, kind="video", max_turns=args.turns, weights=weights))
            elif u < args.video_frac + args.spot_frac:
                out.append(make_episode(rng, kind="spot", max_turns=1, weights=weights))
            else:
                k = kmax if rng.random() < 0.5 else rng.randint(1, kmax)
                kind = "count" if rng.random() < args.count_frac else "images"
                out.append(
                    make_episode(
                        rng,
                        k=k,
                        kind=kind,
                        size=args.image_size,
                        max_turns=args.turns,
                        weights=weights,
                        password_frac=args.password_frac,
                    )
                )
        return out
    for _ in range(args.batch):
        if rng.random() < args.video_frac:
            out.append(make_episode(rng, video=True, max_turns=args.turns, weights=weights))
        else:
            k = kmax if rng.random() < 0.5 else rng.randint(1, kmax)
            out.append(make_episode(rng, k=k, max_turns=args.turns, weights=weights, password_frac=args.password_frac))
    return out


def parse_weights(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in ALL_TASKS:
            raise SystemExit(f"--weights: unknown task {name!r}; choose from {', '.join(ALL_TASKS)}")
        out[name] = float(value)
    return out


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on ``--arch``, filled in place after parsing (what a run records in args.json)."""
    v2 = args.arch == "v2"
    if v2 and args.out == build_parser().get_default("out"):
        args.out = None  # v2 stages write --stage-out; pass --out to export one as well
    if args.retrieval_layer is None:
        args.retrieval_layer = 3 if v2 else 2
    if v2 and args.image_size is None:
        args.image_size = V2_SIZES["needle"]
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.tiny.train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default="training/tiny-v1/model", help="where a v1 run exports its model (v2 stages: --stage-out)"
    )
    p.add_argument("--work", default=".cache/tiny-train", help="checkpoint + log directory (resumes from it)")
    p.add_argument("--steps", type=int, default=4000, help="total optimizer steps (raise it to continue a run)")
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop (checkpointed) at this step while the LR schedule still runs to --steps (replays an interrupted run)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--decay", type=float, default=0.15, help="fraction of --steps with linear LR decay to 0.1x")
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-cell colour/shape probe")
    p.add_argument("--motion-weight", type=float, default=1.0, help="weight of the video motion probe")
    p.add_argument("--bind-weight", type=float, default=1.0, help="weight of the image-index binding probe")
    p.add_argument(
        "--bind-layer", type=int, default=2, help="hidden state (after this many text layers) the binding probe reads"
    )
    p.add_argument(
        "--retrieval-weight",
        type=float,
        default=0.0,
        help="weight of the retrieval-attention loss (text layer --retrieval-layer, query heads 0-1); >0 trains with eager attention",
    )
    p.add_argument(
        "--retrieval-layer",
        type=int,
        default=None,
        help="default 2 (v1) / 3 (v2: v1's layer 2 after the layer inserted before it)",
    )
    p.add_argument(
        "--retrieval-heads", default="0,1", help="query heads of the retrieval loss (v1 and v2: 0,1 share KV head 0)"
    )
    p.add_argument(
        "--eager-all",
        action="store_true",
        help="with the retrieval loss, run every layer eager (the v1 chain did); default: only the retrieval layer",
    )
    p.add_argument(
        "--arch", choices=("v1", "v2"), default="v1", help="v2: training.tiny.grow's shape, vocabulary and processor"
    )
    p.add_argument(
        "--diff-weight", type=float, default=0.0, help="v2: weight of the changed-cell probe (spot_difference scenes)"
    )
    p.add_argument(
        "--diff-layer",
        type=int,
        default=3,
        help="hidden state (after this many text layers) the changed-cell probe reads",
    )
    p.add_argument(
        "--diff-pos-weight",
        type=float,
        default=1.0,
        help="class weight of changed cells in the changed-cell probe's loss (about 3 cells in 49 change)",
    )
    p.add_argument(
        "--spot-retrieval",
        action="store_true",
        help="v2: the retrieval-attention loss also pulls spot_difference's colour word to the changed cells of both pictures",
    )
    p.add_argument(
        "--presence-weight",
        type=float,
        default=0.0,
        help="v2: weight of the per-image colour-presence probe (at <|vision_end|>)",
    )
    p.add_argument("--presence-layer", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None, help="v2: px of the multi-image scenes (default 168)")
    p.add_argument("--spot-frac", type=float, default=0.0, help="v2: share of two-picture (spot_difference) episodes")
    p.add_argument(
        "--count-frac", type=float, default=0.0, help="v2: share of the multi-image scenes drawn as count scenes"
    )
    p.add_argument(
        "--stage-out",
        default=None,
        help="when the stage ends (--steps or --stop-at), write the model, aux heads, metrics and log here "
        "(what scripts/train_tiny_v2.sh commits under training/tiny-v2/<stage>)",
    )
    p.add_argument("--turns", type=int, default=6, help="max QA turns per episode")
    p.add_argument("--video-frac", type=float, default=0.25)
    p.add_argument("--password-frac", type=float, default=0.5, help="share of image scenes with the text fact")
    p.add_argument("--k-start", type=int, default=2)
    p.add_argument("--k-hold", type=int, default=300)
    p.add_argument("--k-ramp", type=int, default=1200)
    p.add_argument("--k-max", type=int, default=MAX_IMAGES)
    p.add_argument("--weights", default="needle=2,colour_at=1,text_needle=1,video_direction=1,video_colour=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=64)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--export-only", action="store_true", help="export the checkpoint to --out and stop")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--init",
        default=None,
        help="warm start: weights (model + aux head) from another work dir's ckpt.pt, "
        "or a stage output / model dir with model.safetensors (+ aux.safetensors); "
        "the optimizer, step and schedules start afresh (used to chain curriculum stages)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = parse_weights(args.weights)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "log.jsonl"

    from mmkv.tiny.tokenizer import build_tokenizer

    from .model import build_model, build_processor, save

    resolve_defaults(args)
    v2 = args.arch == "v2"
    ship_tasks = V2_TASKS if v2 else TASKS
    if v2:
        from .grow import build_v2_model, build_v2_processor

        tok = build_tokenizer(2)
        processor = build_v2_processor(tok)
        model = build_v2_model(tok, seed=args.seed).to(device)
    else:
        tok = build_tokenizer()
        processor = build_processor(tok)
        model = build_model(tok, seed=args.seed).to(device)
    heads = AuxHeads(
        model.config.text_config.hidden_size,
        args.bind_layer,
        args.retrieval_layer,
        [int(h) for h in args.retrieval_heads.split(",")],
    )
    heads.add_v2_probes(
        model.config.text_config.hidden_size,
        args.diff_layer if args.diff_weight > 0 else None,
        args.presence_layer if args.presence_weight > 0 else None,
    )
    heads.diff_class_weight = torch.tensor([1.0, args.diff_pos_weight])
    heads = heads.to(device)
    if args.retrieval_weight > 0:
        if args.eager_all or not v2:
            model.set_attn_implementation("eager")  # attention weights for the retrieval loss
        else:
            heads.hooked = True
        heads.retrieval_on = True
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _name, prm in list(model.named_parameters()) + [("aux." + n, q) for n, q in heads.named_parameters()]:
        (decay if prm.dim() >= 2 else no_decay).append(prm)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    step = 0
    ckpt = work / "ckpt.pt"
    if ckpt.exists() and not args.fresh:
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(_heads_state(state["aux"]))
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        print(f"resumed from {ckpt} at step {step}", flush=True)
    elif args.init:
        src = Path(args.init)
        if (src / "model.safetensors").is_file():  # a stage output (or any saved model dir)
            from safetensors.torch import load_file

            model.load_state_dict(_model_state(load_file(str(src / "model.safetensors"), device=str(device)), model))
            aux_file = src / "aux.safetensors"
            aux_state = load_file(str(aux_file), device=str(device)) if aux_file.is_file() else {}
            missing = _load_heads(heads, aux_state)
            print(f"warm start from {src} (model dir; fresh heads: {missing or 'none'})", flush=True)
        else:
            src = src / "ckpt.pt" if src.is_dir() else src
            if not src.exists():
                raise SystemExit(
                    f"--init: no checkpoint at {src}; pass a work dir of an earlier stage, its ckpt.pt or a stage output dir"
                )
            state = torch.load(src, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            # heads added after the source run start fresh
            missing = heads.load_state_dict(_heads_state(state["aux"]), strict=False).missing_keys
            print(
                f"warm start from {src} (its step {int(state['step'])}; fresh heads: {missing or 'none'})", flush=True
            )

    def export(metrics: dict[str, Any] | None = None, out: str | os.PathLike = args.out) -> None:
        model.eval()
        attn = model.config._attn_implementation
        model.set_attn_implementation("sdpa")  # the exported config never carries the training-only eager setting
        save(model.to("cpu"), processor, out)
        model.to(device)
        model.set_attn_implementation(attn)
        if metrics is not None:
            acc = metrics["heldout_accuracy"]
            # a task ships when it reaches the target at its hardest evaluated setting (8 images / 8 frames)
            hardest = {
                t: min(v for key, v in acc.items() if key.split("@")[0] == t)
                for t in ship_tasks
                if any(key.split("@")[0] == t for key in acc)
            }
            metrics = {
                **metrics,
                "ship_threshold": SHIP_AT,
                "shipped_tasks": [t for t, v in hardest.items() if v >= SHIP_AT],
            }
            (Path(out) / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    def log(record: dict[str, Any]) -> None:
        with log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    encoder = FastEncoder(processor)
    encoder.spot_retrieval = args.spot_retrieval
    evaluator = TeacherForcedEval(
        encoder, args.eval_n, EVAL_SUITES_V2 if v2 else EVAL_SUITES, sizes=V2_SIZES if v2 else None
    )
    if args.export_only:
        if not args.out:
            raise SystemExit("--export-only: pass --out DIR")
        acc = evaluator(model, device)
        print(json.dumps(acc), flush=True)
        export({"step": step, "heldout_accuracy": acc, "n_per_task": args.eval_n})
        return 0

    def save_ckpt() -> None:
        tmp = work / "ckpt.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "aux": heads.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "args": vars(args),
            },
            tmp,
        )
        os.replace(tmp, ckpt)

    log({"event": "start", "step": step, "args": vars(args), "time": time.time(), "device": str(device)})
    model.train()
    t_last = time.time()
    acc_loss = acc_aux = 0.0
    acc_n = 0
    stats_last: dict[str, Any] = {}
    stop = min(args.steps, args.stop_at or args.steps)
    while step < stop:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = _to(encoder.encode(batch_episodes(step, args, weights)), device)
        logits, aux = forward(model, heads, batch)
        loss_ans = answer_loss(logits, batch["labels"])
        loss = (
            loss_ans
            + args.aux_weight * aux["aux_loss"]
            + args.bind_weight * aux["bind_loss"]
            + args.motion_weight * aux["motion_loss"]
            + args.retrieval_weight * aux["retrieval_loss"]
            + args.diff_weight * aux["diff_loss"]
            + args.presence_weight * aux["presence_loss"]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        opt.step()
        step += 1
        acc_loss += float(loss_ans.detach())
        acc_aux += float(aux["aux_loss"].detach())
        acc_n += 1
        stats_last = {k: v for k, v in aux.items() if k.startswith("aux_acc") or k == "retrieval_mass"}
        if step % args.log_every == 0:
            dt = (time.time() - t_last) / acc_n
            rec = {
                "step": step,
                "loss": acc_loss / acc_n,
                "aux": acc_aux / acc_n,
                "lr": lr,
                "k_max": k_max_at(step, args),
                "s_per_step": round(dt, 3),
                **{k: round(v, 3) for k, v in stats_last.items()},
            }
            print(json.dumps(rec), flush=True)
            log(rec)
            acc_loss = acc_aux = 0.0
            acc_n = 0
            t_last = time.time()
        if step % args.ckpt_every == 0 or step == stop:
            save_ckpt()
        if step % args.eval_every == 0 or step == stop:
            t0 = time.time()
            acc = evaluator(model, device)
            rec = {"step": step, "eval": acc, "eval_s": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            log(rec)
            # snapshots go to the work dir; --out gets the model when the run reaches --steps and at
            # least one task reaches SHIP_AT (--export-only forces an export)
            metrics = {"step": step, "heldout_accuracy": acc, "n_per_task": args.eval_n}
            export(metrics, work / "latest")
            if step == args.steps and args.out:
                shipped = json.loads((work / "latest" / "training_metrics.json").read_text())["shipped_tasks"]
                if shipped:
                    export(metrics)
                    print(f"exported to {args.out}; shipped tasks: {', '.join(shipped)}", flush=True)
                else:
                    print(
                        f"no task reached {SHIP_AT:.0%}: not exported to {args.out} (latest snapshot in {work / 'latest'})",
                        flush=True,
                    )
            if args.stage_out and step == args.steps:  # a stage is finished at --steps, not at --stop-at
                write_stage(Path(args.stage_out), model, heads, processor, export, metrics, log_path, args, work)
            model.train()
            t_last = time.time()
    log({"event": "end", "step": step, "time": time.time()})
    if (
        args.stage_out and step >= args.steps and not (Path(args.stage_out) / "metrics.json").is_file()
    ):  # resumed at the end
        t0 = time.time()
        acc = evaluator(model, device)
        log({"step": step, "eval": acc, "eval_s": round(time.time() - t0, 1)})
        write_stage(
            Path(args.stage_out),
            model,
            heads,
            processor,
            export,
            {"step": step, "heldout_accuracy": acc, "n_per_task": args.eval_n},
            log_path,
            args,
            work,
        )
    return 0


def write_stage(
    out: Path,
    model: Any,
    heads: AuxHeads,
    processor: Any,
    export: Any,
    metrics: dict[str, Any],
    log_path: Path,
    args: argparse.Namespace,
    work: Path,
) -> None:
    """A finished stage's output: the loadable model (fp32 safetensors, config, tokenizer, processor), the aux
    heads (``aux.safetensors``), ``metrics.json`` (held-out accuracy, steps, wall time), ``log.jsonl`` and
    ``args.json``. No optimizer state: the next stage starts from these weights with a fresh optimizer."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    export(metrics, out)
    (out / "training_metrics.json").unlink(missing_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, str(out / "aux.safetensors"))
    shutil.copyfile(log_path, out / "log.jsonl")
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    wall = sum(r.get("s_per_step", 0) * args.log_every for r in records if "s_per_step" in r)
    evals = sum(r.get("eval_s", 0) for r in records if "eval_s" in r)
    import platform

    info = {
        **metrics,
        "stage": out.name,
        "steps": metrics["step"],
        "train_wall_s": round(wall),
        "eval_wall_s": round(evals),
        "hardware": f"{platform.machine()} {os.cpu_count()} CPU cores, torch threads {args.threads}",
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "args": vars(args),
    }
    (out / "metrics.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n", encoding="utf-8")
    print(f"stage output written to {out}", flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _model_state(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """A saved ``model.safetensors`` state for ``load_state_dict`` (an untied lm_head, keys as the model names them)."""
    own = model.state_dict()
    if set(state) == set(own):
        return state
    fixed = {}
    for k, v in state.items():
        key = k if k in own else next((o for o in own if o.endswith(k) or k.endswith(o)), k)
        fixed[key] = v
    return fixed


def _load_heads(heads: AuxHeads, state: dict[str, torch.Tensor]) -> list[str]:
    """Load what fits (same shapes); return the keys that start fresh."""
    own = heads.state_dict()
    ok = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    heads.load_state_dict(ok, strict=False)
    return [k for k in own if k not in ok]


if __name__ == "__main__":
    sys.exit(main())
