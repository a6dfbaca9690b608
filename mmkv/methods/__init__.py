"""Compression methods: one file and one dataclass per method, behind :class:`Method`.

Every module of this package that defines a :class:`Method` subclass with its own ``name`` string is
registered automatically (adding a method = adding a file); the classes are also exported here.
The named methods are presets of composable parts (:mod:`.compose`: scorers and budget policies,
whose names are derived from their parts and which are not registered; :mod:`.decode`: typed
decode-time policies), see docs/methods.md, "Composing methods".
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from .base import LayerContext, LayerPlan, MergeRecord, Method, pool1d, reduce_to_kv_heads, topk_plus_recent
from .compose import (
    H2OScorer,
    HeadAdaptive,
    LayerEntropy,
    ModalityAdaptive,
    Policy,
    Pyramid,
    Scorer,
    SinkScorer,
    SnapKVScorer,
    TextPrior,
    Uniform,
)
from .decode import ChunkRetrieval, DecodePolicy, H2OEviction

METHODS: dict[str, type[Method]] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name == "base" or _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _cls in vars(_module).values():
        if (
            inspect.isclass(_cls)
            and issubclass(_cls, Method)
            and _cls.__module__ == _module.__name__
            and isinstance(vars(_cls).get("name"), str)
        ):
            if _cls.name in METHODS and METHODS[_cls.name] is not _cls:
                raise RuntimeError(f"two methods are named {_cls.name!r}: {METHODS[_cls.name]} and {_cls}")
            METHODS[_cls.name] = _cls
            globals()[_cls.__name__] = _cls


def _key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def make_method(method: str | Method, **params: Any) -> Method:
    """A method instance from its name (case-, '-' and '_'-insensitive) and hyper-parameters, or the instance itself."""
    if isinstance(method, Method):
        if params:
            raise ValueError("pass hyper-parameters either in the Method instance or as keywords, not both")
        return method
    by_key = {_key(name): cls for name, cls in METHODS.items()}
    key = _key(method)
    if key not in by_key:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    try:
        return by_key[key](**params)
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters for {key}: {err}") from None


__all__ = [
    "METHODS",
    "make_method",
    "Method",
    "LayerContext",
    "LayerPlan",
    "MergeRecord",
    "reduce_to_kv_heads",
    "pool1d",
    "topk_plus_recent",
    *sorted(c.__name__ for c in METHODS.values()),
    "Scorer",
    "SinkScorer",
    "H2OScorer",
    "SnapKVScorer",
    "TextPrior",
    "Policy",
    "Uniform",
    "Pyramid",
    "HeadAdaptive",
    "LayerEntropy",
    "ModalityAdaptive",
    "DecodePolicy",
    "H2OEviction",
    "ChunkRetrieval",
]
