"""The ``"mmkv"`` attention implementation, registered through transformers' AttentionInterface.

It wraps sdpa. Outside an active :class:`~mmkv.runtime.session.Session` (or for modules that are not the
session's decoder layers, e.g. the vision tower) it *is* sdpa. Inside one, for each decoder layer:

- if the layer's cache is compressed, the layer computes attention over what it physically holds
  (:meth:`mmkv.cache.layers.CompressedLayer.attend`), with its own causal mask — layers can hold different
  numbers of tokens, so the single mask transformers builds from layer 0 cannot serve them all;
- during the prefill of the compressed span, the output is computed by sdpa with the full KV, then
  the session computes the statistics its method declared and (for layer-local methods) compresses
  the layer at once.

The active session lives in a :mod:`contextvars` variable, so concurrent requests in different
threads (e.g. a Gradio app sharing one model) do not see each other's sessions.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:
    from ..runtime.session import Session

ATTENTION_NAME = "mmkv"
ACTIVE_SESSION: ContextVar[Session | None] = ContextVar("mmkv_active_session", default=None)


def mmkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry point: ``(module, q, k, v, mask, ...) -> (output [B, q, H, d], None)``."""
    session = ACTIVE_SESSION.get()
    layer_idx = session.layer_index(module) if session is not None else None
    if session is None or layer_idx is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return session.attend(layer_idx, module, query, key, value, attention_mask, dropout, scaling, kwargs), None


def register() -> None:
    """Register ``"mmkv"`` with transformers (idempotent); the mask function is sdpa's."""
    AttentionInterface.register(ATTENTION_NAME, mmkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()
