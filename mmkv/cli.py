"""Command line (installed as ``mmkv``; also ``python -m mmkv``).

    mmkv run --image a.png --image b.png --prompt "Which image has the red circle?" --method snapkv --budget 0.2
    mmkv run ... --save run.mmkvrun  # the run as one file the app opens without the model
    mmkv app                       # the Gradio app (needs the app extra: pip install "mmkv[app]")
    mmkv methods                   # every method with its defaults and paper
    mmkv bench ...                 # speed and KV bytes per method (docs/benchmarks.md)
    mmkv eval ...                  # accuracy / KL / KV ratio per method and budget (docs/eval.md)
    mmkv eval --followup ...       # two-question conversations: a kept cache vs a re-read (docs/eval.md, Multi-turn)

``--model`` defaults to the bundled teaching model; give a hub id or a checkpoint directory for others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .inputs.budget import parse_budget
from .methods import METHODS

__all__ = ["build_parser", "main", "parse_budget"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmkv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a prompt with a compressed KV cache and print a summary")
    run.add_argument(
        "--model",
        default="bundled",
        help="hub id or local directory of a supported VLM, or any causal LM for text-only prompts "
        "(default: the bundled teaching model)",
    )
    run.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    run.add_argument("--video", default=None, help="video file (read with OpenCV)")
    run.add_argument("--prompt", required=True, help="the question / instruction")
    run.add_argument("--method", default="snapkv", choices=sorted(METHODS), help="compression method")
    run.add_argument("--budget", type=parse_budget, default=0.2, help="ratio in (0, 1] or absolute tokens per head")
    run.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    run.add_argument("--num-frames", type=int, default=8, help="frames sampled from the video")
    run.add_argument("--fps", type=float, default=None, help="sample the video at this rate instead of --num-frames")
    run.add_argument("--query-agnostic", action="store_true", help="compress the context before the question is read")
    run.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    run.add_argument("--trace", default=None, help="write the Trace as JSON to this file (checked before the run)")
    run.add_argument(
        "--save",
        default=None,
        metavar="RUN_FILE",
        help="save the run (trace, prompt tokens, thumbnails of the images and frames) as one file, "
        "e.g. run.mmkvrun, that the app opens without the model (checked before the run)",
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method hyper-parameter, e.g. --param window=16 (repeatable)",
    )

    sub.add_parser("methods", help="list the methods and their defaults")

    for name, what in (
        ("bench", "decode speed and physical KV bytes per method (mmkv bench --help)"),
        ("eval", "accuracy / KL / KV ratio per method and budget, synthetic or MileBench (mmkv eval --help)"),
    ):
        forward = sub.add_parser(name, help=what, add_help=False)
        forward.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    app = sub.add_parser("app", help='start the Gradio app (needs: pip install "mmkv[app]")')
    app.add_argument("--model", default=None, help="model to serve (default: $MMKV_MODEL, else the bundled one)")
    app.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1; $GRADIO_SERVER_NAME)")
    app.add_argument("--port", type=int, default=None, help="port (default: 7860; $GRADIO_SERVER_PORT)")
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


def _check_output_path(path: str | None, flag: str = "--trace", example: str = "trace.json") -> None:
    """Fail before the run (not after it) when an output file cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name such as {example}")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist; create it or pick another path")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable; pick another path")


def _run(args: argparse.Namespace) -> int:
    from .inputs.prompt import chat as build_chat

    videos = [args.video] if args.video else []
    chat = build_chat(args.prompt, images=args.image, videos=videos)  # refuses an empty prompt
    for path in [*args.image, *videos]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    _check_output_path(args.trace)
    _check_output_path(args.save, "--save", "run.mmkvrun")
    params = _parse_params(args.param)

    import torch

    from . import generate, load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load(args.model, device=device)
    result = generate(
        model,
        processor,
        chat,
        method=args.method,
        budget=args.budget,
        max_new_tokens=args.max_new_tokens,
        query_aware=not args.query_agnostic,
        num_frames=None if args.fps else args.num_frames,
        video_fps=args.fps,
        **params,
    )
    trace = result.trace
    print(result.text)
    print("---")
    counts = trace.modality.counts() if trace.modality is not None else {}
    summary = trace.summary()
    print(
        f"prompt tokens: {trace.prompt_length} ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
        f"generated {summary['new_tokens']}"
    )
    budget = "none (Full keeps everything)" if trace.method == "full" else trace.budget
    print(f"method: {trace.method}  budget: {budget}  kept: {summary['kept_ratio']:.1%} of (token, layer, head)")
    print(
        f"KV bytes: full {summary['kv_bytes_full']:,}  compressed {summary['kv_bytes_compressed']:,}  "
        f"at end {summary['kv_bytes_end']:,}"
    )
    print(
        f"times: prefill {summary['prefill_ms']} ms (stats {summary['stats_ms']} ms, compression "
        f"{summary['compress_ms']} ms), decode {summary['decode_ms_per_token']} ms/token"
    )
    if args.trace:
        trace.to_json(args.trace)
        print(f"trace written to {args.trace}")
    if args.save:
        from .trace.runfile import save_run

        save_run(result, args.save, processor, question=args.prompt)
        print(f"run saved to {args.save} (open it in the app's Inspect, or with mmkv.load_run)")
    return 0


def _app(args: argparse.Namespace) -> int:
    for value, name in (
        (args.model, "MMKV_MODEL"),
        (args.host, "GRADIO_SERVER_NAME"),
        (args.port, "GRADIO_SERVER_PORT"),
    ):
        if value is not None:
            os.environ[name] = str(value)
    try:
        import gradio  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as exc:
        raise ValueError(f'the app needs Gradio and plotly ({exc.name} is missing): pip install "mmkv[app]"') from None
    from .app import main as app_main

    app_main()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("bench", "eval"):  # the experiments' own parsers (and their --help) take the rest
        if argv[0] == "bench":
            from .experiments.bench import main as experiment
        elif "--followup" in argv:  # the multi-turn evaluation (mmkv/experiments/multiturn.py)
            from .experiments.multiturn import main as experiment

            argv = [a for a in argv if a != "--followup"]
        else:
            from .experiments.eval import main as experiment
        return experiment(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        from dataclasses import fields

        for name, cls in sorted(METHODS.items()):
            defaults = ", ".join(f"{f.name}={f.default!r}" for f in fields(cls))
            print(f"{name:14s} {defaults}\n{'':14s} {cls.reference}")
        return 0
    try:
        return _app(args) if args.command == "app" else _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
