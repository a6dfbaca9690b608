"""Teaching model v2's shape and its function-preserving start from v1 (``docs/tiny-v2.md``).

v2 is still ``Qwen2VLForConditionalGeneration``: text hidden 256, 6 layers, 8 query heads over 4 KV heads
(grouped-query attention, 2 query heads per KV head), head_dim 32 and M-RoPE sections [4, 6, 6] as in v1,
MLP 512; the v1 vision tower with its merger widened to 256; the v2 vocabulary (v1's ids + the new tasks'
words).

Why the width grows: Qwen2-VL's attention fixes ``head_dim = hidden_size / num_attention_heads``, so 8 heads
of v1's head_dim 32 (which M-RoPE's sections and every learned v1 head depend on) need hidden 256. At hidden
128, 8 heads would be 16 wide and no v1 head could be kept.

:func:`grow` maps v1's weights into v2 so that v2 computes v1's function exactly (fp32 rounding aside):

- **width 128 -> 256**: every writer into the residual stream (embeddings, the vision merger's output,
  attention ``o_proj`` and MLP ``down_proj``) is zero on the 128 new dimensions, so they stay zero; RMSNorm
  over 256 dims of which 128 are zero sees ``mean(x^2) / 2``, so norm weights are scaled by ``1/sqrt(2)``
  and ``rms_norm_eps`` is halved (``(m + eps) / 2 == m/2 + eps/2``): the normalised old dims are unchanged.
  Readers of the new dims (q/k/v/gate/up/lm_head columns) start small and random, so gradients reach the
  zero writers and the new width can learn.
- **heads 4 -> 8, KV heads 2 -> 4**: each KV head is duplicated (KV head ``j`` of v2 is v1's ``j // 2``);
  under each, the two query heads are v1's two query heads of that group, so every v1 query head appears
  twice, reading identical keys and values. The two copies' ``o_proj`` columns are ``a * W`` and
  ``(1 - a) * W`` with ``a`` random per entry in [0.25, 0.75]: the sum is v1's output exactly, yet the
  copies get different gradients and can diverge (equal halves would stay equal forever).
- **layers 4 -> 6**: new layers (after v1 layers ``NEW_AFTER``) have ``o_proj`` and ``down_proj`` at zero,
  so they add nothing to the residual stream until trained.
- **vocabulary 313 -> 381**: new tokens' embeddings are small random vectors; their ``lm_head`` rows copy
  ``<unk>``'s row (which v1 never predicts, a very low logit), so every v1 argmax stays.

``tests/test_tiny_tasks.py`` checks the oracle: v2's logits over v1's vocabulary equal v1's on held-out
prompts (Full cache), and greedy answers are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmkv.tiny.tokenizer import build_tokenizer

from .model import build_config, build_model, build_processor

__all__ = [
    "V2_TEXT",
    "V2_VISION",
    "V2_MAX_PIXELS",
    "NEW_AFTER",
    "V1_ASSET",
    "build_v2_config",
    "build_v2_processor",
    "build_v2_model",
    "layer_map",
    "load_v1",
    "grow",
]

V2_TEXT = {
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 512,
    "rms_norm_eps": 5e-6,  # v1's 1e-5 halved: see the module docstring
}
V2_VISION = {"hidden_size": 256}  # the merger's output width = the text hidden size
V2_MAX_PIXELS = 196 * 196  # spot_difference's pictures (49 tokens); the other image tasks use 168 px (36)
NEW_AFTER = (1, 3)  # v2 = [v1.0, v1.1, new, v1.2, v1.3, new]
V1_ASSET = Path(__file__).resolve().parents[1] / "tiny-v1"  # training/tiny-v1: v1 as shipped until v2 (a copy)


def build_v2_config(tokenizer: Any) -> Any:
    return build_config(tokenizer, text=V2_TEXT, vision=V2_VISION)


def build_v2_processor(tokenizer: Any | None = None) -> Any:
    return build_processor(tokenizer if tokenizer is not None else build_tokenizer(2), max_pixels=V2_MAX_PIXELS)


def build_v2_model(tokenizer: Any | None = None, seed: int = 0) -> Any:
    """A freshly initialised v2 model (the shape only; :func:`grow` gives the v1-equivalent start)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(2)
    return build_model(tokenizer, seed=seed, config=build_v2_config(tokenizer))


def layer_map(n_old: int = 4, new_after: Sequence[int] = NEW_AFTER) -> list[int | None]:
    """For each v2 layer, the v1 layer it copies (None: a new, zero-output layer)."""
    out: list[int | None] = []
    for i in range(n_old):
        out.append(i)
        if i in new_after:
            out.append(None)
    return out


def load_v1(path: str | Path = V1_ASSET) -> Any:
    """The shipped v1 model (fp32, sdpa), loaded offline."""
    import transformers

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@torch.no_grad()
def grow(
    v1: Any, tokenizer: Any | None = None, seed: int = 0, new_after: Sequence[int] = NEW_AFTER, reader_std: float = 0.02
) -> Any:
    """v2 computing ``v1``'s function (see the module docstring); seeded."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(2)
    v2 = build_v2_model(tokenizer, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = reader_std) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t1, t2 = v1.config.text_config, v2.config.text_config
    d, D = t1.hidden_size, t2.hidden_size
    hd = d // t1.num_attention_heads
    if D // t2.num_attention_heads != hd:
        raise ValueError(f"head_dim must stay {hd}")
    if abs(t2.rms_norm_eps * D / d - t1.rms_norm_eps) > 1e-12:
        raise ValueError("rms_norm_eps must scale with d / D")
    scale = math.sqrt(d / D)  # RMS over D dims of which only d are non-zero

    def norm(dst: Any, src: Any) -> None:  # RMSNorm modules
        dst.weight.fill_(scale)
        if src is not None:
            dst.weight[:d] = src.weight * scale

    def widen_in(dst: torch.Tensor, src: torch.Tensor) -> None:
        """A reader: old input columns from ``src``, new input columns small random."""
        dst.copy_(rnd(*dst.shape))
        dst[:, :d] = src

    m1, m2 = v1.model, v2.model
    # vision tower: identical but for the merger's output width
    sd = {k: v for k, v in m1.visual.state_dict().items()}
    own = m2.visual.state_dict()
    for k, v in sd.items():
        if own[k].shape == v.shape:
            own[k].copy_(v)
    last = [k for k in sd if k.startswith("merger.mlp.") and sd[k].shape != own[k].shape]
    for k in last:  # merger.mlp.2.{weight,bias}: rows of the new dims zero
        own[k].zero_()
        own[k][:d] = sd[k]
    # embeddings and LM head
    v_old = v1.config.text_config.vocab_size
    e1, e2 = m1.language_model.embed_tokens.weight, m2.language_model.embed_tokens.weight
    e2.zero_()
    e2[:v_old, :d] = e1
    e2[v_old:, :d] = rnd(e2.shape[0] - v_old, d, std=float(e1.std()))
    h1, h2 = v1.lm_head.weight, v2.lm_head.weight
    unk = tokenizer.unk_token_id
    widen_in(h2, torch.cat([h1, h1[unk : unk + 1].expand(h2.shape[0] - v_old, d)]))
    norm(m2.language_model.norm, m1.language_model.norm)
    # decoder layers
    nq1, nkv1 = t1.num_attention_heads, t1.num_key_value_heads
    nq2, nkv2 = t2.num_attention_heads, t2.num_key_value_heads
    if nkv2 % nkv1 or nq2 // nkv2 != nq1 // nkv1:
        raise ValueError("grow keeps the query heads per KV head and duplicates KV heads")
    dup = nkv2 // nkv1
    group = nq1 // nkv1
    # v2 query head -> v1 query head: KV head j of v2 copies v1's KV head j // dup; its query heads copy that group
    q_src = [(j // dup) * group + r for j in range(nkv2) for r in range(group)]
    kv_src = [j // dup for j in range(nkv2)]
    mapping = layer_map(t1.num_hidden_layers, new_after)
    if len(mapping) != t2.num_hidden_layers:
        raise ValueError(f"{len(mapping)} layers from the map, config has {t2.num_hidden_layers}")
    for i2, i1 in enumerate(mapping):
        L2 = m2.language_model.layers[i2]
        a2, mlp2 = L2.self_attn, L2.mlp
        if i1 is None:
            a2.o_proj.weight.zero_()
            mlp2.down_proj.weight.zero_()
            continue
        L1 = m1.language_model.layers[i1]
        a1, mlp1 = L1.self_attn, L1.mlp
        norm(L2.input_layernorm, L1.input_layernorm)
        norm(L2.post_attention_layernorm, L1.post_attention_layernorm)

        def heads(w: torch.Tensor, src: Sequence[int]) -> torch.Tensor:
            return torch.cat([w[h * hd : (h + 1) * hd] for h in src])

        widen_in(a2.q_proj.weight, heads(a1.q_proj.weight, q_src))
        a2.q_proj.bias.copy_(heads(a1.q_proj.bias, q_src))
        widen_in(a2.k_proj.weight, heads(a1.k_proj.weight, kv_src))
        a2.k_proj.bias.copy_(heads(a1.k_proj.bias, kv_src))
        widen_in(a2.v_proj.weight, heads(a1.v_proj.weight, kv_src))
        a2.v_proj.bias.copy_(heads(a1.v_proj.bias, kv_src))
        # o_proj: each v1 head's columns split between its copies as a * W and (1 - a) * W
        o1 = a1.o_proj.weight  # [d, nq1 * hd]
        o2 = a2.o_proj.weight  # [D, nq2 * hd]
        o2.zero_()
        share = torch.rand(d, nq1 * hd, generator=g) * 0.5 + 0.25
        seen: dict[int, int] = {}
        for h2, h1 in enumerate(q_src):
            w = o1[:, h1 * hd : (h1 + 1) * hd]
            a = share[:, h1 * hd : (h1 + 1) * hd]
            copy = seen.get(h1, 0)
            if dup == 1:
                part = w
            elif dup == 2:
                part = w * a if copy == 0 else w - w * a  # the two parts add up to w to the last bit where fp32 allows
            else:
                part = w / dup
            o2[:d, h2 * hd : (h2 + 1) * hd] = part
            seen[h1] = copy + 1
        widen_in(mlp2.gate_proj.weight, mlp1.gate_proj.weight)
        widen_in(mlp2.up_proj.weight, mlp1.up_proj.weight)
        mlp2.down_proj.weight.zero_()
        mlp2.down_proj.weight[:d] = mlp1.down_proj.weight
    v2.generation_config = v1.generation_config
    return v2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.tiny.grow OUT``: write the grown v2 start (a loadable model dir) to OUT."""
    import argparse

    from .model import save

    p = argparse.ArgumentParser(prog="python -m training.tiny.grow", description=main.__doc__)
    p.add_argument("out")
    p.add_argument("--v1", default=str(V1_ASSET))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tok = build_tokenizer(2)
    v2 = grow(load_v1(args.v1), tok, seed=args.seed)
    save(v2, build_v2_processor(tok), args.out)
    print(f"grown v2 ({sum(p.numel() for p in v2.parameters()):,} parameters) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
