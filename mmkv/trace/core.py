"""The Trace: everything a run decided and measured, JSON round-trippable, for viz and the app."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import torch

from ..inputs.modality import ModalityMap

if TYPE_CHECKING:
    from .replay import StepState


class Packed:
    """A trace value held as (nested lists / dicts of) CPU tensors until someone reads it as Python lists.

    A 32k-token prompt keeps millions of positions: the session stores them as a few compact
    tensors per layer and :class:`LayerTrace` turns them into lists only when they are read.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = _compact(value)

    def lists(self) -> Any:
        return _lists(self.value)


def _compact(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point():
            return value.to("cpu", torch.float32)
        if value.dtype == torch.bool:
            return value.cpu()
        small = value.numel() == 0 or (int(value.min()) >= -(2**31) and int(value.max()) < 2**31)
        return value.to("cpu", torch.int32 if small else torch.int64)
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    return value


def _lists(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lists(v) for v in value]
    return value


_T = TypeVar("_T")


class _Lazy(Generic[_T]):
    """A :class:`LayerTrace` field that may be assigned a :class:`Packed` value, read back as lists (once)."""

    def __init__(self, required: bool = False) -> None:
        self.required = required

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> _T:
        if obj is None:  # the dataclass asks for the default
            if self.required:
                raise AttributeError(self.slot)
            return cast(_T, None)  # the default of an optional field
        value = obj.__dict__[self.slot]
        if isinstance(value, Packed):
            value = obj.__dict__[self.slot] = value.lists()
        return value

    def __set__(self, obj: Any, value: _T | Packed) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class LayerTrace:
    """One decoder layer: what was kept per KV head and why.

    The per-head and per-step lists may be given as :class:`Packed` tensors (the session does):
    they become Python lists on first read, so a long prompt's trace costs a few tensors until it
    is drawn or written to JSON.
    """

    layer: int
    kept: _Lazy[list[list[int]]] = _Lazy(required=True)  # per KV head: logical prompt positions kept after compression
    # kept has no default at runtime (its descriptor raises when the dataclass asks), so these may follow it.
    bytes_before: int  # type: ignore[misc]  # physical KV bytes of this layer right after prefill
    bytes_after: int  # type: ignore[misc]  # ... and right after compression
    merges: _Lazy[list[dict[str, list] | None] | None] = _Lazy()  # per KV head: {"source", "target", "similarity"}
    info: dict[str, Any] = field(default_factory=dict)  # method-specific numbers (capacities, entropy, ...)
    modality_mass: _Lazy[list[list[float]] | None] = _Lazy()  # per query head: share on [text, image, video]
    entropy: _Lazy[list[float] | None] = _Lazy()  # per query head, window queries (nats)
    scores: _Lazy[list[list[float]] | None] = _Lazy()  # per KV head, the method's token scores (optional)
    decode_evictions: _Lazy[list[list[int]] | None] = (
        _Lazy()
    )  # per eviction (H2O: one per decode step), position per KV head
    decode_retrievals: _Lazy[list[list[list[int]]] | None] = (
        _Lazy()
    )  # per forward, per dynamic head: chunk ids (HybridKV)
    decode_eviction_steps: list[int] | None = None  # the step of each ``decode_evictions`` row (Trace.step_state)
    decode_retrieval_steps: list[int] | None = None  # the step of each ``decode_retrievals`` row

    @property
    def budgets(self) -> list[int]:
        """Kept tokens per KV head (read without turning packed positions into lists)."""
        raw = self.__dict__["_kept"]
        if isinstance(raw, Packed):
            return [int(k.numel()) for k in raw.value]
        return [len(k) for k in raw]


@dataclass
class Timings:
    """Wall-clock seconds; on a GPU, device time between CUDA events (resolved when the session finishes)."""

    prefill_s: float = 0.0  # the whole prefill forward, statistics and layer-local compression included
    stats_s: float = 0.0  # computing the requested attention statistics (inside prefill)
    compress_s: float = 0.0  # planning + applying the plan (inside prefill, plus the global pass)
    decode_s: list[float] = field(default_factory=list)  # one entry per decode forward

    @property
    def decode_ms_per_token(self) -> float:
        return 1000.0 * sum(self.decode_s) / len(self.decode_s) if self.decode_s else 0.0


@dataclass
class Trace:
    """A run of one method on one prompt."""

    method: str
    params: dict[str, Any]
    budget: float | int
    capacity: int  # average tokens per (layer, KV head) the budget allows
    query_aware: bool
    prompt_length: int  # tokens in the whole prompt
    span_length: int  # tokens in the compressed span (== prompt_length when query-aware)
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    bytes_per_token_head: int  # bytes of one token's key+value in one KV head
    modality: ModalityMap | None = None
    layers: list[LayerTrace] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    model: str = ""
    family: str = ""
    answer: str = ""
    generated_ids: list[int] = field(default_factory=list)
    bytes_end: int = 0  # physical KV bytes on the device when generation ended (generated tokens included)
    host_bytes_end: int = 0  # KV bytes offloaded to host memory (HybridKV's dynamic heads)
    # ---- decode replay (mmkv/trace/replay.py): step 0 = after compression, step t = after the t-th decode forward
    generated_tokens: list[str] = field(default_factory=list)  # per generated id: the text it added (driver)
    step_bytes: list[int] = field(default_factory=list)  # physical KV bytes on the device after each step
    step_lengths: list[int] = field(default_factory=list)  # logical tokens in the cache after each step

    # ---- summaries -------------------------------------------------------------------------
    @property
    def bytes_full(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_compressed(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def kept_tokens(self) -> int:
        """Kept (token, KV head) pairs summed over layers."""
        return sum(sum(layer.budgets) for layer in self.layers)

    @property
    def kept_ratio(self) -> float:
        total = self.span_length * self.num_kv_heads * self.num_layers
        return self.kept_tokens / total if total else 1.0

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "query_aware": self.query_aware,
            "prompt_tokens": self.prompt_length,
            "compressed_span": self.span_length,
            "kept_ratio": round(self.kept_ratio, 4),
            "kv_bytes_full": self.bytes_full,
            "kv_bytes_compressed": self.bytes_compressed,
            "kv_bytes_end": self.bytes_end,
            "prefill_ms": round(1000 * self.timings.prefill_s, 2),
            "stats_ms": round(1000 * self.timings.stats_s, 2),
            "compress_ms": round(1000 * self.timings.compress_s, 2),
            "decode_ms_per_token": round(self.timings.decode_ms_per_token, 3),
            "new_tokens": self.new_tokens,
        }

    @property
    def new_tokens(self) -> int:
        """Tokens generated: the recorded ids (mmkv's driver), else — around a plain ``model.generate`` —
        one from the prefill plus one per decode forward (the last token is never fed back)."""
        if self.generated_ids:
            return len(self.generated_ids)
        return len(self.timings.decode_s) + 1 if self.timings.prefill_s > 0 else 0

    # ---- decode replay ---------------------------------------------------------------------
    @property
    def decode_steps(self) -> int:
        """Recorded steps: step 0 (after compression) plus one per decode forward (0 if not recorded)."""
        return len(self.step_lengths)

    def step_state(self, step: int, layer: int | None = None, head: int | None = None) -> StepState:
        """What the cache holds after ``step``, per position, over the chosen layer(s)/KV head(s) (None = all).

        See :class:`mmkv.trace.replay.StepState`; the replay index is built once per trace and cached.
        """
        from .replay import replay_of  # local import: replay imports this module

        return replay_of(self).state(step, layer, head)

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("modality", "layers", "timings")}
        d["modality"] = self.modality.to_dict() if self.modality is not None else None
        d["layers"] = [asdict(layer) for layer in self.layers]
        d["timings"] = asdict(self.timings)
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        d = dict(d)
        modality = ModalityMap.from_dict(d.pop("modality")) if d.get("modality") else None
        d.pop("modality", None)
        layers = [LayerTrace(**layer) for layer in d.pop("layers")]
        timings = Timings(**d.pop("timings"))
        return cls(**d, modality=modality, layers=layers, timings=timings)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Trace:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))
