"""Count the aten operations a piece of code dispatches: a device-independent cost of a decode step.

On a GPU a decode step is launch-bound, so the number of kernels it dispatches predicts its time better
than any CPU timing; host syncs (``.item()``, ``.tolist()``, ``torch.equal``) stall the CPU until the
device catches up. :class:`OpCounter` counts both, by op name, through ``TorchDispatchMode``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

#: Ops that only make views or change metadata (no kernel on the data).
VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "expand",
        "select",
        "slice",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "t",
        "as_strided",
        "unbind",
        "split",
        "alias",
        "detach",
        "narrow",
        "_reshape_alias",
        "lift_fresh",
    }
)
#: Ops that copy a device value to the host (a sync on CUDA).
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero"})


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` counts every aten op by name (``aten.mm.default`` -> ``mm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Every op, views and metadata included."""
        return sum(self.ops.values())

    @property
    def compute(self) -> int:
        """Ops that touch data (views and metadata left out)."""
        return self.total - sum(n for op, n in self.ops.items() if op in VIEW_OPS)

    @property
    def syncs(self) -> int:
        """Device-to-host reads."""
        return sum(self.ops[name] for name in SYNC_OPS)


def count_ops(fn: Callable[[], Any]) -> int:
    """Every aten op ``fn()`` dispatches."""
    with OpCounter() as counter:
        fn()
    return counter.total
