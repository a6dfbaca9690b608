"""Budgets as users write them: ``"0.2"`` is a ratio, ``"256"`` an absolute token count per layer and KV head."""

from __future__ import annotations

import argparse


def parse_budget(text: str) -> float | int:
    """``"0.2"`` -> ratio 0.2; ``"256"`` -> 256 tokens (an integer means an absolute count).

    Raises :class:`argparse.ArgumentTypeError` (a ``ValueError``) with a fixable message otherwise.
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be a ratio like 0.2 or a token count like 256, got {text!r}"
        ) from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"a budget ratio must be in (0, 1] (e.g. 0.2), got {text!r}; token counts are whole numbers"
        )
    return value
