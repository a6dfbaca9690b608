"""Measure the app on this machine: start (imports + default model), a Chat turn, a Compare run.

    .venv/bin/python scripts/measure_app.py [--methods full,snapkv,adakv] [--repeat 3]

Uses the app's own event functions (the code a browser click runs) on the default model
($MMKV_MODEL, else the bundled teaching model, else the tiny random demo model) and the first and
fourth bundled examples (six images; an image and a video). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="full,snapkv,adakv")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from mmkv.app import build_app
    from mmkv.bundled import EXAMPLES_DIR
    from mmkv.ui.handlers import AppState

    app = build_app()
    app.context.store.get()
    start_s = time.perf_counter() - t0
    examples = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    msgs = [{"text": e["text"], "files": [str(EXAMPLES_DIR / f) for f in e["files"]]} for e in examples]
    methods = [m for m in args.methods.split(",") if m]
    out = {
        "model": app.context.store.default,
        "random_weights": app.context.notice is not None,
        "start_s": round(start_s, 2),
    }
    for name, msg in ((f"{len(msgs[0]['files'])} images", msgs[0]), ("image + video", msgs[3])):
        chat_s, cmp_s = [], []
        for _ in range(args.repeat):
            state = AppState()
            t = time.perf_counter()
            updates = list(app.on_chat(msg, state, "snapkv", 0.3, 0, True, args.max_new_tokens, 8, ""))
            chat_s.append(time.perf_counter() - t)
            status = updates[-1][app.chat_status]
            assert status.startswith("Done"), status
            t = time.perf_counter()
            res = app.on_compare(
                msg, methods, 0.3, 0, "", True, args.max_new_tokens, 8, True, state, progress=lambda *a, **k: None
            )
            cmp_s.append(time.perf_counter() - t)
            assert res[app.cmp_status].startswith("Ran"), res[app.cmp_status]
        out[name] = {
            "chat_turn_s": round(statistics.median(chat_s), 3),
            f"compare_{'+'.join(methods)}_s": round(statistics.median(cmp_s), 3),
            "prompt_tokens": state.runs[state.last].trace.prompt_length,
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
