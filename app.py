"""Hugging Face Space / checkout entry point: ``python app.py`` serves the mmkv app (see mmkv/app.py).

Installed, the same app starts with ``mmkv app``.
"""

import contextlib
import sys
from pathlib import Path

with contextlib.suppress(Exception):  # ZeroGPU: `spaces` must be imported before torch (not on a Space: no-op)
    import spaces  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from mmkv.app import demo, main  # noqa: E402

__all__ = ["demo", "main"]

if __name__ == "__main__":
    main()
