"""Hugging Face Space / checkout entry point: ``python app.py`` serves the mmkv app (see mmkv/app.py).

Installed, the same app starts with ``mmkv app``. ``demo`` is what Spaces and Gradio's reload mode
(``gradio app.py``) read.
"""

import contextlib

with contextlib.suppress(Exception):  # ZeroGPU: `spaces` must be imported before torch (not on a Space: no-op)
    import spaces  # noqa: F401

from mmkv.app import build_demo, main

demo = build_demo()

if __name__ == "__main__":
    main(demo)
