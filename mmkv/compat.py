"""What differs between the transformers releases mmkv supports (5.17 up to the newest).

transformers 5.24 renamed the cache argument of model forwards and ``generate`` from
``past_key_values`` to ``cache`` (the old name still works there, with a deprecation warning, until
5.40). mmkv passes the name the loaded model's ``forward`` declares and reads either name in its hooks.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch

#: The cache argument's names, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


@cache
def _cache_argument_of(forward: Any) -> str:
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins / C functions
        return "past_key_values"
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    return "past_key_values"


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which ``model``'s forward takes the KV cache (``"cache"`` from 5.24 on)."""
    return _cache_argument_of(type(model).forward)


def model_config(model: torch.nn.Module) -> Any:
    """``model.config``, typed ``Any``: a transformers config's fields come from the checkpoint (and
    ``torch.nn.Module`` types an unknown attribute as ``Tensor | Module``)."""
    return model.config


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the name ``model``'s forward declares, for ``model(**inputs, **cache_kwargs(...))``."""
    return {cache_argument(model): cache}


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The cache object a forward call received, under either name (None when there is none)."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
