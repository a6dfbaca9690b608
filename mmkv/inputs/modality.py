"""Which prompt token came from where: text, an image patch, or a video-frame patch.

A :class:`ModalityMap` lets any per-token value (kept / evicted / merged, a score) be painted back
onto the pixels it came from. Adapters build it from token ids (or ``mm_token_type_ids``) and the
processor's grid information; nothing here assumes a fixed number of tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2
MODALITY_NAMES = ("text", "image", "video")


@dataclass
class VisualItem:
    """One image or one video frame (temporal patch group) as the language model sees it.

    ``rows`` x ``cols`` is the token grid after the connector's merge (e.g. Qwen's 2x2 spatial
    merge), i.e. the grid the ``(row, col)`` cells of :class:`ModalityMap` refer to. ``tile`` names
    a crop for tiling processors (LLaVA-OneVision anyres, Idefics3 splits): ``"global"`` or
    ``"r{i}c{j}"``; a single-view image uses ``"full"``.
    """

    modality: int  # IMAGE or VIDEO
    source: int  # index of the image (for IMAGE) or of the video (for VIDEO) in the chat
    frame: int  # frame index within the video (temporal group); 0 for images
    tile: str
    rows: int
    cols: int
    start: int  # first prompt position of this item's tokens
    length: int  # number of tokens of this item (rows*cols, plus newline tokens where a model adds them)


@dataclass
class ModalityMap:
    """Per-token provenance of a prompt of length ``L``.

    - ``modality[t]``: TEXT / IMAGE / VIDEO
    - ``item[t]``: index into ``items`` (-1 for text)
    - ``row[t]``, ``col[t]``: cell of the item's token grid (-1 for text and for separator tokens
      such as LLaVA-OneVision's ``image_newline`` that sit inside an image span)
    """

    modality: torch.Tensor  # int8 [L]
    item: torch.Tensor  # int32 [L]
    row: torch.Tensor  # int32 [L]
    col: torch.Tensor  # int32 [L]
    items: list[VisualItem] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.modality.numel()
        for name in ("item", "row", "col"):
            if getattr(self, name).numel() != n:
                raise ValueError(f"ModalityMap.{name} has {getattr(self, name).numel()} entries, expected {n}")

    def __len__(self) -> int:
        return self.modality.numel()

    @property
    def visual(self) -> torch.Tensor:
        """Bool mask of image or video tokens."""
        return self.modality != TEXT

    @property
    def text(self) -> torch.Tensor:
        return self.modality == TEXT

    def counts(self) -> dict[str, int]:
        return {name: int((self.modality == code).sum()) for code, name in enumerate(MODALITY_NAMES)}

    def prefix(self, length: int) -> ModalityMap:
        """The map of the first ``length`` tokens (the compressed context in query-agnostic mode)."""
        items = [it for it in self.items if it.start < length]
        return ModalityMap(self.modality[:length], self.item[:length], self.row[:length], self.col[:length], items)

    @classmethod
    def text_only(cls, length: int) -> ModalityMap:
        minus = torch.full((length,), -1, dtype=torch.int32)
        return cls(torch.zeros(length, dtype=torch.int8), minus.clone(), minus.clone(), minus.clone(), [])

    @classmethod
    def from_items(
        cls, length: int, items: list[VisualItem], cells: list[tuple[list[int], list[int], list[int]]]
    ) -> ModalityMap:
        """Build a map from items and, per item, the (positions, rows, cols) of its grid tokens."""
        m = cls.text_only(length)
        for index, (it, (pos, rows, cols)) in enumerate(zip(items, cells)):
            span = slice(it.start, it.start + it.length)
            m.modality[span] = it.modality
            m.item[span] = index
            p = torch.as_tensor(pos, dtype=torch.long)
            m.row[p] = torch.as_tensor(rows, dtype=torch.int32)
            m.col[p] = torch.as_tensor(cols, dtype=torch.int32)
        m.items = list(items)
        return m

    def to_dict(self) -> dict:
        return {
            "modality": self.modality.tolist(),
            "item": self.item.tolist(),
            "row": self.row.tolist(),
            "col": self.col.tolist(),
            "items": [vars(it) for it in self.items],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModalityMap:
        return cls(
            torch.tensor(d["modality"], dtype=torch.int8),
            torch.tensor(d["item"], dtype=torch.int32),
            torch.tensor(d["row"], dtype=torch.int32),
            torch.tensor(d["col"], dtype=torch.int32),
            [VisualItem(**it) for it in d["items"]],
        )


def grid_item(
    modality: int, source: int, frame: int, rows: int, cols: int, start: int, tile: str = "full"
) -> tuple[VisualItem, tuple[list[int], list[int], list[int]]]:
    """A plain row-major grid of ``rows*cols`` tokens starting at ``start`` (Qwen-VL, LLaVA-1.5, Idefics3 tiles)."""
    item = VisualItem(modality, source, frame, tile, rows, cols, start, rows * cols)
    pos = list(range(start, start + rows * cols))
    r = [i // cols for i in range(rows * cols)]
    c = [i % cols for i in range(rows * cols)]
    return item, (pos, r, c)
