"""Export: figures as one self-contained HTML file (plotly.js inlined, works offline), PNG when possible."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import plotly.graph_objects as go
from PIL import Image

from .colors import EVICTED, KEPT, MERGED, MODALITY_COLORS, STATE_WORDS, hex_color

__all__ = ["figures_html", "figure_png", "png_available", "overlay_key"]


def figures_html(
    figures: Sequence[tuple[str, go.Figure]],
    images: Sequence[tuple[Image.Image, str]] = (),
    title: str = "mmkv report",
    notes: str = "",
    present: bool = False,
) -> str:
    """One HTML page with every figure (interactive) and every overlay image (embedded PNG), with a key
    that says in words what each overlay colour and pattern means. ``present``: larger text and images."""
    size, width = (20, 560) if present else (13, 360)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>body{{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;font-size:{size}px}}"
        f"figure{{display:inline-block;margin:6px;vertical-align:top}}figcaption{{font-size:{size}px;max-width:{width}px}}"
        f"img{{image-rendering:pixelated;max-width:{width}px}}.key span{{display:inline-block;margin-right:1.2em}}"
        ".key i{display:inline-block;width:1em;height:1em;vertical-align:middle;margin-right:.3em;"
        "border:1px solid #222}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        parts.append(f"<pre>{html.escape(notes)}</pre>")
    first = True
    for name, fig in figures:
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first))
        first = False
    if images:
        parts.append("<h2>Kept / evicted / merged cells</h2>")
        parts.append(overlay_key())
        for img, caption in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def overlay_key() -> str:
    """HTML key of the overlays and token colours, in plain words."""

    def swatch(colour: str, words: str, css: str = "") -> str:
        return f"<span><i style='background:{colour};{css}'></i>{html.escape(words)}</span>"

    stripes = f"repeating-linear-gradient(135deg,{hex_color(EVICTED)} 0 2px,#ccc 2px 6px)"
    dots = f"radial-gradient({hex_color(MERGED)} 35%,#222 40%,#ccc 55%) 0 0/6px 6px"
    return (
        "<p class='key'>"
        + swatch(
            "transparent",
            "kept in the cache: the image's own colours, dark-blue outline",
            f"border:3px solid {hex_color(KEPT)}",
        )
        + swatch(stripes, f"{STATE_WORDS['evicted']}: faded grey, vermillion hatching", "background-color:#ccc")
        + swatch(dots, f"{STATE_WORDS['merged']}: faded grey, yellow dots; a white line points to the kept token")
        + "<br>All layers / all heads: the more layer × head pairs kept a cell, the more of its colour shows; the map "
        "on the right gives the share (white 0 %, dark blue 100 %). "
        + "<br>In charts, colour says what happened to a token and grey says what kind of token it is: "
        + "".join(swatch(c, f"{m} token") for m, c in MODALITY_COLORS.items())
        + "</p>"
    )


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
