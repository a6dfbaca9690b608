"""Loaded models shared by all app sessions (a small LRU), with load errors turned into UserErrors."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError

__all__ = ["LoadedModel", "ModelStore", "SUGGESTED_MODELS"]

#: Shown in the model dropdown (any hub id or local path can be typed in).
SUGGESTED_MODELS = (
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2-VL-2B-Instruct",
    "HuggingFaceTB/SmolVLM-256M-Instruct",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
)


@dataclass
class LoadedModel:
    name: str
    model: Any
    processor: Any
    load_s: float

    @property
    def family(self) -> str:
        return str(getattr(self.model.config, "model_type", "?"))

    @property
    def context(self) -> int | None:
        cfg = self.model.config.get_text_config(decoder=True)
        return getattr(cfg, "max_position_embeddings", None)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> str:
        params = self.parameters
        device = next(self.model.parameters()).device
        return f"`{self.name}` · {self.family} · {params / 1e6:.1f} M parameters · {device} · loaded in {self.load_s:.1f} s"


#: Below this many parameters a model runs on one CPU thread: tiny matmuls gain nothing from more
#: threads and lose a lot when the cores are shared (measured: 30x slower Compare with 2 busy threads).
SMALL_MODEL_PARAMETERS = 50_000_000


def cpu_threads(loaded: LoadedModel, default: int) -> int:
    """torch CPU threads for running ``loaded``: ``MMKV_THREADS`` if set, 1 for small models, else ``default``."""
    env = os.environ.get("MMKV_THREADS", "").strip()
    if env:
        return max(1, int(env))
    return 1 if loaded.parameters < SMALL_MODEL_PARAMETERS else default


class ModelStore:
    """Load on first use, keep the ``capacity`` most recently used models (weights are large)."""

    def __init__(self, default: str, capacity: int | None = None) -> None:
        self.default = default
        self.capacity = capacity or int(os.environ.get("MMKV_MAX_MODELS", "2"))
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._default_threads = torch.get_num_threads()

    def get(self, name: str | None = None) -> LoadedModel:
        """The loaded model (loading it if needed), with torch's CPU threads set for it."""
        name = (name or "").strip() or self.default
        found = self._models.get(name)
        if found is None:
            with self._lock:
                found = self._models.get(name)
                if found is None:
                    found = self._load(name)
                    self._models[name] = found
                    while len(self._models) > self.capacity:
                        self._models.popitem(last=False)
        threads = cpu_threads(found, self._default_threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return found

    def loaded(self) -> list[str]:
        return list(self._models)

    @staticmethod
    def _load(name: str) -> LoadedModel:
        from .. import load

        t0 = time.perf_counter()
        try:
            model, processor = load(name)
        except UserError:
            raise
        except (ValueError, OSError, ImportError, RuntimeError, KeyError) as exc:
            message = str(exc).strip() or type(exc).__name__
            raise UserError(
                f"cannot load the model {name!r}: {message} — type a local checkpoint directory or a hub id of a "
                "supported family (the previous model stays selected)"
            ) from exc
        return LoadedModel(name, model, processor, time.perf_counter() - t0)
