"""Turn-2 latency of a chat with a kept compressed cache vs re-reading the conversation, at a widened shape.

    .venv/bin/python scripts/measure_chat_memory.py [--images 8] [--px 448] [--method snapkv] [--budget 0.3]

The bundled model's family and processor (Qwen2-VL) with random weights at a CPU-sized widened shape
(8 layers, hidden 1024, 16 query / 8 KV heads, head_dim 64; a vision tower of 2 blocks) and large images
(448 px: 256 visual tokens each), so turn 1 holds thousands of tokens. Turn 1 asks about the images; turn 2
is a text-only follow-up answered (a) with ``mmkv.Conversation``'s kept cache (prefill only turn 2) and
(b) by re-reading the whole conversation (vision encoding and prefill of every token again). One run each;
prints one JSON object with the times, the tokens read and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image


def widened(model: torch.nn.Module) -> torch.nn.Module:
    from transformers import Qwen2VLForConditionalGeneration

    config = model.config.__class__.from_dict(model.config.to_dict())
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 2048, 8
    text.num_attention_heads, text.num_key_value_heads = 16, 8
    text.head_dim = 64
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[0]] * text.num_hidden_layers
    text.rope_parameters = {**(text.rope_parameters or {}), "mrope_section": [8, 12, 12]}
    text.max_position_embeddings = 32768
    vision = config.vision_config
    vision.hidden_size = 1024  # the merger's output width = the text width (Qwen2-VL)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--px", type=int, default=448)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import mmkv

    small, processor = mmkv.load("bundled", device="cpu")
    model = widened(small)
    pixels = args.px * args.px
    ip = processor.image_processor
    ip.max_pixels = pixels
    if isinstance(getattr(ip, "size", None), dict):
        ip.size = {**ip.size, "longest_edge": pixels}
    rng = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 255, (args.px, args.px, 3), generator=rng, dtype=torch.uint8).numpy())
        for _ in range(args.images)
    ]
    first, second = "Which image has the red circle?", "Which image has the blue square?"
    out: dict[str, object] = {"method": args.method, "budget": args.budget, "threads": args.threads}
    for setting in ("kept", "reread"):
        conv = mmkv.Conversation(model, processor, args.method, args.budget, record_attention=False)
        r1 = conv.ask(first, images=images, max_new_tokens=args.new_tokens)
        t0 = time.perf_counter()
        r2 = conv.ask(second, max_new_tokens=args.new_tokens, reread=setting == "reread")
        wall = time.perf_counter() - t0
        out[setting] = {
            "turn1_prompt_tokens": r1.prepared.length,
            "turn2_tokens_read": r2.prefilled,
            "turn2_conversation_tokens": r2.prepared.length,
            "turn2_prefill_s": round(r2.prefill_s, 3),
            "turn2_wall_s": round(wall, 3),
            "turn2_new_tokens": len(r2.token_ids),
            "kv_bytes_after_turn2": r2.cache_bytes,
        }
        conv.reset()
    kept, reread = out["kept"], out["reread"]
    assert isinstance(kept, dict) and isinstance(reread, dict)
    out["turn2_wall_ratio_reread_over_kept"] = round(reread["turn2_wall_s"] / kept["turn2_wall_s"], 2)
    out["turn2_prefill_ratio_reread_over_kept"] = round(
        reread["turn2_prefill_s"] / max(kept["turn2_prefill_s"], 1e-9), 1
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
