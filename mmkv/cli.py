"""Command line: ``python -m mmkv run --model PATH --image a.png --prompt "..." --method snapkv --budget 0.2``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .methods import METHODS


def parse_budget(text: str) -> float | int:
    """``"0.2"`` -> ratio 0.2; ``"256"`` -> 256 tokens (an integer means an absolute count)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a ratio like 0.2 or a token count like 256, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a prompt with a compressed KV cache and print a summary")
    run.add_argument("--model", required=True, help="hub id or local directory of a supported VLM")
    run.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    run.add_argument("--video", default=None, help="video file (read with OpenCV)")
    run.add_argument("--prompt", required=True, help="the question / instruction")
    run.add_argument("--method", default="snapkv", choices=sorted(METHODS), help="compression method")
    run.add_argument("--budget", type=parse_budget, default=0.2, help="ratio in (0, 1] or absolute tokens per head")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--num-frames", type=int, default=8, help="frames sampled from the video")
    run.add_argument("--fps", type=float, default=None, help="sample the video at this rate instead of --num-frames")
    run.add_argument("--query-agnostic", action="store_true", help="compress the context before the question is read")
    run.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    run.add_argument("--trace", default=None, help="write the Trace as JSON to this file")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="method hyper-parameter, e.g. --param window=16 (repeatable)")

    sub.add_parser("methods", help="list the methods and their defaults")
    return parser


def _parse_params(items: Sequence[str]) -> dict:
    params = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _run(args: argparse.Namespace) -> int:
    import torch

    from . import generate, load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load(args.model, device=device)
    content = [{"type": "image", "image": path} for path in args.image]
    if args.video:
        content.append({"type": "video", "video": args.video})
    content.append({"type": "text", "text": args.prompt})
    chat = [{"role": "user", "content": content}]
    result = generate(
        model, processor, chat, method=args.method, budget=args.budget, max_new_tokens=args.max_new_tokens,
        query_aware=not args.query_agnostic, num_frames=None if args.fps else args.num_frames, video_fps=args.fps,
        **_parse_params(args.param),
    )
    trace = result.trace
    print(result.text)
    print("---")
    counts = trace.modality.counts() if trace.modality is not None else {}
    summary = trace.summary()
    print(f"prompt tokens: {trace.prompt_length} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    print(f"method: {trace.method}  budget: {trace.budget}  kept: {summary['kept_ratio']:.1%} of (token, layer, head)")
    print(f"KV bytes: full {summary['kv_bytes_full']:,}  compressed {summary['kv_bytes_compressed']:,}  "
          f"at end {summary['kv_bytes_end']:,}")
    print(f"times: prefill {summary['prefill_ms']} ms (stats {summary['stats_ms']} ms, compression "
          f"{summary['compress_ms']} ms), decode {summary['decode_ms_per_token']} ms/token")
    if args.trace:
        trace.to_json(args.trace)
        print(f"trace written to {args.trace}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        from dataclasses import fields

        for name, cls in sorted(METHODS.items()):
            defaults = ", ".join(f"{f.name}={f.default!r}" for f in fields(cls))
            print(f"{name:14s} {defaults}\n{'':14s} {cls.reference}")
        return 0
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
