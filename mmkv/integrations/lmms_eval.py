"""An lmms-eval model that answers through :func:`mmkv.generate` with any mmkv method and budget.

    pip install 'mmkv[lmms]'
    lmms-eval --model mmkv --model_args pretrained=Qwen/Qwen2-VL-2B-Instruct,method=snapkv,budget=0.2 --tasks mme

Model arguments: ``pretrained`` (hub id or local checkpoint; default the bundled teaching model),
``method`` (default ``snapkv``), ``budget`` (a ratio like ``0.2`` or tokens per head like ``64``),
``query_aware`` (default true), ``max_new_tokens`` (default 128, a task's ``max_new_tokens`` wins),
``trace_log`` (a JSONL file: one trace summary per sample), ``device``, and any method
hyper-parameter by name. Each request's visuals (PIL images, image paths, video paths) come first in the
user turn, then the task's text with ``<image>`` tags removed; ``until`` strings cut the answer. Every
sample's trace summary (physical KV ratio, bytes, timings) is logged and kept in ``model.traces``.
Only ``generate_until`` tasks run: a compressed cache is a generation-time device, so loglikelihood
and multi-round tasks raise ``NotImplementedError``.

lmms-eval finds the class through the ``lmms_eval.models`` entry point (:func:`manifest`) or, with
lmms-eval's older loader, ``LMMS_EVAL_PLUGINS=mmkv.integrations``. This module imports lmms-eval only
when :data:`MMKV` is first used; :class:`MMKVAdapter` holds all the logic and needs only objects with
lmms-eval's ``Instance.args``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger("mmkv.lmms_eval")

_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def visual_parts(visuals: Any) -> list[dict[str, Any]]:
    """Chat parts for what a task's ``doc_to_visual`` returned (``None``, one visual, or a list of them)."""
    if visuals is None:
        return []
    items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    parts: list[dict[str, Any]] = []
    for v in items:
        if isinstance(v, (list, tuple)):
            parts.extend(visual_parts(v))
        elif isinstance(v, (str, Path)) and str(v).lower().endswith(_VIDEO_SUFFIXES):
            parts.append({"type": "video", "video": str(v)})
        elif v is not None:
            parts.append({"type": "image", "image": v})
    return parts


def cut_at_stop(text: str, until: Sequence[str] | str | None) -> str:
    """``text`` up to the first of the ``until`` strings (lmms-eval's stop sequences)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


class MMKVAdapter:
    """lmms-eval's ``generate_until`` served by :func:`mmkv.generate` (no lmms-eval import here)."""

    def __init__(
        self,
        pretrained: str = "bundled",
        method: str = "snapkv",
        budget: Any = 0.2,
        query_aware: Any = True,
        max_new_tokens: Any = 128,
        trace_log: str | None = None,
        device: str | None = None,
        model: Any = None,
        processor: Any = None,
        **method_params: Any,
    ) -> None:
        from ..inputs.budget import parse_budget
        from ..methods import METHODS
        from ..models import load

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
        for key in ("batch_size", "device_map", "max_batch_size"):  # lmms-eval's own settings: batch size is 1
            method_params.pop(key, None)
        self.method, self.budget = method, parse_budget(str(budget))
        self.query_aware, self.max_new_tokens = _flag(query_aware), int(max_new_tokens)
        self.method_params = method_params
        self.trace_log = Path(trace_log) if trace_log else None
        if model is None:
            model, processor = load(pretrained, device=device if device not in (None, "", "auto") else None)
        self.model, self.processor = model, processor
        self.traces: list[dict[str, Any]] = []

    def chat(self, context: str, visuals: Any) -> list[dict[str, Any]]:
        """The user turn for one request: the visuals, then the text without lmms-eval's ``<image>`` tags."""
        text = context.replace("<image>", "").strip()
        return [{"role": "user", "content": visual_parts(visuals) + [{"type": "text", "text": text}]}]

    def answer(self, context: str, gen_kwargs: dict[str, Any], visuals: Any, tag: dict[str, Any]) -> str:
        """One request: generate with the compressed cache, log the trace summary, cut at ``until``."""
        from ..runtime.driver import generate

        kwargs = dict(gen_kwargs or {})
        temperature = float(kwargs.get("temperature", 0) or 0)
        result = generate(
            self.model,
            self.processor,
            self.chat(context, visuals),
            self.method,
            self.budget,
            max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
            query_aware=self.query_aware,
            do_sample=_flag(kwargs.get("do_sample", False)) and temperature > 0,
            temperature=temperature or 1.0,
            top_p=float(kwargs.get("top_p", 1.0) or 1.0),
            record_attention=False,
            **self.method_params,
        )
        trace = result.trace
        summary = {
            **tag,
            "method": self.method,
            "budget": self.budget,
            "kv_ratio": trace.bytes_compressed / trace.bytes_full if trace.bytes_full else 1.0,
            **{k: v for k, v in trace.summary().items() if isinstance(v, (int, float, str, bool))},
        }
        self.traces.append(summary)
        logger.info("mmkv %s", json.dumps(summary))
        if self.trace_log:
            with open(self.trace_log, "a") as f:
                f.write(json.dumps(summary) + "\n")
        return cut_at_stop(result.text, kwargs.get("until"))

    def generate_until(self, requests: Sequence[Any], task_dict: dict[str, Any] | None = None) -> list[str]:
        """Answers for lmms-eval ``generate_until`` requests: ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            doc = (task_dict or {})[task][split][doc_id] if doc_to_visual is not None else None
            visuals = doc_to_visual(doc) if doc_to_visual is not None else None
            out.append(self.answer(context, gen_kwargs, visuals, {"task": task, "doc_id": doc_id}))
        return out


@lru_cache(maxsize=1)
def _model_class() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError as e:
        raise ImportError("the lmms-eval plugin needs lmms-eval: pip install 'mmkv[lmms]'") from e

    class MMKV(lmms):
        """lmms-eval model ``mmkv``: any lmms-eval generation task through an mmkv compressed KV cache."""

        is_simple = True

        def __init__(self, **kwargs: Any) -> None:
            super().__init__()
            self.adapter = MMKVAdapter(**kwargs)

        @property
        def traces(self) -> list[dict[str, Any]]:
            return self.adapter.traces

        def generate_until(self, requests: list[Any]) -> list[str]:
            return self.adapter.generate_until(requests, self.task_dict)

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            raise NotImplementedError("mmkv compresses the KV cache for generation: run generate_until tasks")

        def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
            raise NotImplementedError("mmkv: multi-round tasks are not supported")

    MMKV.__module__ = __name__
    return MMKV


def manifest() -> Any:
    """lmms-eval's registration payload (entry point group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmkv", simple_class_path=f"{__name__}.MMKV")


def __getattr__(name: str) -> Any:
    if name == "MMKV":
        return _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
