"""Export: figures as one self-contained HTML file (plotly.js inlined, works offline), PNG when possible."""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence

import plotly.graph_objects as go
from PIL import Image

__all__ = ["figures_html", "figure_png", "png_available"]


def figures_html(
    figures: Sequence[tuple[str, go.Figure]],
    images: Sequence[tuple[Image.Image, str]] = (),
    title: str = "mmkv report",
    notes: str = "",
) -> str:
    """One HTML page with every figure (interactive) and every overlay image (embedded PNG)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}"
        "figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:12px;max-width:320px}"
        "img{image-rendering:pixelated;max-width:320px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        parts.append(f"<pre>{html.escape(notes)}</pre>")
    first = True
    for name, fig in figures:
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False))
        first = False
    if images:
        parts.append("<h2>Kept / evicted / merged cells</h2>")
        for img, caption in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def png_available() -> bool:
    """True when plotly can render static images here (kaleido installed and a browser it can drive)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return True


def figure_png(fig: go.Figure, width: int = 900, height: int | None = None) -> bytes | None:
    """PNG bytes of a figure through kaleido, or None when static export is unavailable offline."""
    if not png_available():
        return None
    try:
        return fig.to_image(format="png", width=width, height=height or fig.layout.height or 400)
    except Exception:  # kaleido present but no usable browser: HTML export still works
        return None
