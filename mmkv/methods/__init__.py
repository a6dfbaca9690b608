"""Compression methods: one file and one dataclass per method, behind :class:`Method`."""

from __future__ import annotations

from typing import Any

from .adakv import AdaKV
from .base import LayerContext, LayerPlan, MergeRecord, Method, pool1d, reduce_to_kv_heads, topk_plus_recent
from .full import Full
from .h2o import H2O
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Full, StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV)
}


def make_method(method: str | Method, **params: Any) -> Method:
    """A method instance from its name (case-insensitive) and hyper-parameters, or the instance itself."""
    if isinstance(method, Method):
        if params:
            raise ValueError("pass hyper-parameters either in the Method instance or as keywords, not both")
        return method
    key = str(method).lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[key](**params)
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters for {key}: {err}") from None


__all__ = [
    "METHODS", "make_method", "Method", "LayerContext", "LayerPlan", "MergeRecord",
    "Full", "StreamingLLM", "H2O", "SnapKV", "PyramidKV", "AdaKV",
    "reduce_to_kv_heads", "pool1d", "topk_plus_recent",
]
