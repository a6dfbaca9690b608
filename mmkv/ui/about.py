"""The About tab: how each method decides what to keep, short and visual (toy keep patterns).

Each pattern is a toy prompt of 24 tokens — system text, an image, a short video, the question —
drawn once per row (layer or KV head) with the tokens a method would keep in green, evicted in red,
and merged (folded into a kept token) in blue. Methods added later still get an entry (their
docstring, reference and hyper-parameters), without a drawing.
"""

from __future__ import annotations

import html
from dataclasses import fields

from ..methods import METHODS

__all__ = ["about_html", "DESCRIPTIONS"]

# toy prompt: 3 system/text, 10 image (orange band), 6 video (green band), 5 question
_BAND = "ttt" + "i" * 10 + "v" * 6 + "qqqqq"

# (one-paragraph explanation, {row label: pattern}) — K kept, . evicted, M merged
DESCRIPTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "full": (
        "The uncompressed cache: every token of every layer stays. The reference every other method is compared with.",
        {"every layer/head": "K" * 24},
    ),
    "streamingllm": (
        "Keeps the first few tokens (attention sinks) and the most recent ones; no scores at all. "
        "Cheap, but blind to content: images in the middle of the prompt go first.",
        {"every layer/head": "KKKK" + "." * 13 + "K" * 7},
    ),
    "h2o": (
        "Heavy hitters: tokens with the largest attention received so far, plus a recent window. "
        "Optionally evicts during decoding too.",
        {"every layer/head": "KK.K..K...K..K..." + "K" * 7},
    ),
    "snapkv": (
        "An observation window (the last prompt tokens, i.e. the question) votes with its attention; "
        "votes are pooled so neighbours survive together; the window itself is kept.",
        {"every layer/head": "K.....KKK....KK...." + "KKKKK"},
    ),
    "pyramidkv": (
        "SnapKV's selection with a pyramid of budgets: lower layers keep more, upper layers fewer, "
        "because attention funnels onto fewer tokens higher up.",
        {
            "layer 0": "KK...KKKK.KKKK.KK..KKKKK",
            "layer 1": "K.....KKK....KK....KKKKK",
            "layer 2": "K......K......K....KKKKK",
        },
    ),
    "adakv": (
        "SnapKV scores, but the layer's budget is shared between heads adaptively: a focused head "
        "gives tokens to a head whose attention is spread out (with a floor for every head).",
        {"KV head 0": "K......KK..........KKKKK", "KV head 1": "KK.KKK.KKK.KK.K.K..KKKKK"},
    ),
    "lookm": (
        "LOOK-M: text first — text tokens are kept, visual tokens compete by attention; evicted visual "
        "tokens are merged into their most similar kept token instead of vanishing.",
        {"every layer/head": "KKK" + "MMKMMMKKMM" + "MKMMMK" + "KKKKK"},
    ),
    "meda": (
        "MEDA: the cross-modal attention entropy of each layer sets its budget (layers that mix text and "
        "vision keep more); within a layer a text prior plus recent window, then merging.",
        {
            "layer 0 (high entropy)": "KKK" + "KKMKKMKKMK" + "KMKKMK" + "KKKKK",
            "layer 1 (low entropy)": "KKK" + "MMMKMMMMMM" + "MMMMKM" + "KKKKK",
        },
    ),
    "madakv": (
        "MadaKV: each head's budget is split between text and visual tokens by that head's modality "
        "preference (measured on a proxy window); layers that over- or under-spend are compensated "
        "in the layers after them.",
        {
            "KV head 0 (visual-leaning)": "K.." + "KKK.KK.KK." + "K.K..." + "KKKKK",
            "KV head 1 (text-leaning)": "KKK" + "....K....." + "......" + "KKKKK",
        },
    ),
    "hybridkv": (
        "HybridKV: heads are classified from their text-centric attention sparsity. Static heads are "
        "pruned once (text prior); dynamic heads keep the full KV offloaded in chunks and retrieve the "
        "most relevant chunks at every decoding step.",
        {
            "static head": "KKK" + "..K......." + "......" + "KKKKK",
            "dynamic head (step t)": "KKK" + "KKKK......" + "..KKKK" + "KKKKK",
        },
    ),
}

_COLOURS = {"K": "#2ea043", ".": "#d73027", "M": "#316ec8"}
_BAND_COLOURS = {"t": "#4C78A8", "q": "#4C78A8", "i": "#F58518", "v": "#54A24B"}


def _cells(pattern: str, colours: dict[str, str], height: int = 14) -> str:
    return "".join(
        f"<span style='display:inline-block;width:14px;height:{height}px;margin:1px;border-radius:2px;"
        f"background:{colours.get(ch, '#ccc')}'></span>"
        for ch in pattern
    )


def _diagram(rows: dict[str, str]) -> str:
    out = [
        "<table style='border-collapse:collapse;margin:4px 0 10px 0'>",
        f"<tr><td style='font-size:11px;color:#666;padding-right:8px'>prompt</td><td>{_cells(_BAND, _BAND_COLOURS, 6)}</td></tr>",
    ]
    for label, pattern in rows.items():
        out.append(
            f"<tr><td style='font-size:12px;padding-right:8px;white-space:nowrap'>{html.escape(label)}</td>"
            f"<td>{_cells(pattern, _COLOURS)}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _params(cls: type) -> str:
    try:
        items = [(f.name, getattr(cls(), f.name)) for f in fields(cls)]
    except TypeError:
        return ""
    if not items:
        return "<i>no hyper-parameters</i>"
    return ", ".join(f"<code>{html.escape(k)}={html.escape(repr(v))}</code>" for k, v in items)


def about_html() -> str:
    legend = (
        "<p><b>Legend</b> — prompt band: <span style='color:#4C78A8'>■ text</span> "
        "<span style='color:#F58518'>■ image</span> <span style='color:#54A24B'>■ video</span>; "
        "tokens: <span style='color:#2ea043'>■ kept</span> <span style='color:#d73027'>■ evicted</span> "
        "<span style='color:#316ec8'>■ merged into a kept token</span>. These are toy patterns for teaching; "
        "the <b>Compare</b> and <b>Inspect</b> tabs show what each method really kept on your input.</p>"
    )
    intro = (
        "<p>A vision-language model stores a key and a value for every prompt token in every layer (the "
        "<b>KV cache</b>). Images and videos add hundreds or thousands of tokens, so the cache dominates memory. "
        "A <b>compression method</b> decides, after the prompt has been read, which tokens each layer and head "
        "keeps. The <b>budget</b> is the share (e.g. 0.2) or number of tokens kept per layer and KV head.</p>"
        "<p><b>Query-aware</b> (the papers' setting): the whole prompt, question included, is read with the full "
        "cache and compressed afterwards, so the <i>first</i> answer token is computed before any eviction and "
        "compression shows from the second token on. <b>Query-agnostic</b>: only the context (images, video, "
        "earlier text) is compressed, then the question is read against the compressed cache.</p>"
    )
    parts = ["<div style='max-width:980px'>", intro, legend]
    order = [m for m in DESCRIPTIONS if m in METHODS] + sorted(m for m in METHODS if m not in DESCRIPTIONS)
    for name in order:
        cls = METHODS[name]
        text, rows = DESCRIPTIONS.get(name, ((cls.__doc__ or "").strip().split("\n\n")[0], {}))
        ref = getattr(cls, "reference", "")
        parts.append(f"<h3 style='margin-bottom:2px'>{html.escape(name)}</h3>")
        parts.append(f"<p style='margin:2px 0'>{html.escape(text)}</p>")
        if rows:
            parts.append(_diagram(rows))
        parts.append(
            f"<p style='font-size:12px;color:#555;margin:2px 0 12px 0'>{html.escape(ref)}"
            f"{'<br>' if ref else ''}Hyper-parameters: {_params(cls)}</p>"
        )
    parts.append("</div>")
    return "\n".join(parts)
