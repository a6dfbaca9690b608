"""Measure how the running app copes with bad inputs and with many users at once.

    .venv/bin/python scripts/measure_robustness.py [--concurrent 64] [--skip-default-queue]

Starts ``python app.py`` in a subprocess on a free localhost port (the bundled teaching model: MMKV_MODEL is
removed from its environment) and drives it over HTTP with ``gradio_client`` — the same path a browser takes,
so Gradio's own input checks run too.

1. Bad inputs: 40+ distinct bad requests across Chat, Compare and Inspect (files made in a temp dir and
   uploaded with ``handle_file``). Each is recorded as: served (the client raised nothing), clear (the status
   output starts with "⚠️"), the message (first 160 characters), whether it shows an absolute server path, and
   whether the app log gained a "Traceback" during the request. A crash is: the client raised (the server
   answered with an error instead of mmkv's message), the app died, or a traceback was logged. Errors raised by
   Gradio's own input validation (e.g. "Value 1.5 is greater than maximum value 1.0.") are crashes by that
   definition, and are also counted apart (``gradio_validation``) since the handler never saw the value.
   NaN values go through a hand-made HTTP request (gradio_client refuses to encode NaN; Python's JSON on the
   server accepts it). Afterwards one good Chat request must still answer.
2. Concurrency: N Chat requests of the first bundled example (snapkv, budget 0.3, 16 new tokens), each from
   its own client (its own session, so no request sees another's conversation), submitted at once. The app
   runs with MMKV_QUEUE_SIZE=128 so all are queued; then (unless --skip-default-queue) once more with the
   default queue size (16), where requests beyond the queue are refused by Gradio with "queue full".

Prints one JSON object, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "mmkv" / "assets" / "examples"
RUNS = ROOT / "mmkv" / "assets" / "runs"
PATH_RE = re.compile(
    r"(?<![\w.:/])(/(?:tmp|work|home|root|var|usr|private|Users|opt|srv|mnt)/[^\s'\"`)]*|[A-Za-z]:\\\\[^\s]*)"
)


# ---- the app process -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """``python app.py`` on a free port, its output in a log file."""

    def __init__(self, workdir: Path, queue_size: int | None, name: str):
        self.port = free_port()
        self.log_path = workdir / f"app-{name}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("MMKV_MODEL", "MMKV_QUEUE_SIZE")}
        env.update(
            GRADIO_SERVER_PORT=str(self.port),
            GRADIO_SERVER_NAME="127.0.0.1",
            GRADIO_ANALYTICS_ENABLED="False",
            PYTHONUNBUFFERED="1",
        )
        if queue_size is not None:
            env["MMKV_QUEUE_SIZE"] = str(queue_size)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- the app writes to it until stop() closes it
        self.proc = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}/"
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited ({self.proc.returncode}) before listening:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.perf_counter() - t0 > 300:
                    raise RuntimeError("the app did not listen within 300 s") from None
                time.sleep(0.3)
        self.start_s = time.perf_counter() - t0

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def client(url: str) -> Any:
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


# ---- bad-input files -------------------------------------------------------------------------
def make_files(d: Path) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    rnd = random.Random(0)
    f: dict[str, Path] = {}
    f["txt"] = d / "notes.txt"
    f["txt"].write_text("just some text, not an image\n")
    f["empty_png"] = d / "empty.png"
    f["empty_png"].write_bytes(b"")
    f["empty_mp4"] = d / "empty.mp4"
    f["empty_mp4"].write_bytes(b"")
    f["corrupt_png"] = d / "corrupt.png"
    f["corrupt_png"].write_bytes(bytes(rnd.getrandbits(8) for _ in range(4096)))
    f["truncated_png"] = d / "truncated.png"
    f["truncated_png"].write_bytes((EXAMPLES / "needle_1.png").read_bytes()[:200])
    f["corrupt_mp4"] = d / "corrupt.mp4"
    f["corrupt_mp4"].write_bytes(bytes(rnd.getrandbits(8) for _ in range(64 * 1024)))
    f["huge_png"] = d / "huge-9000x9000.png"  # 81 MP > Limits.max_image_pixels (40 MP), but a small file
    Image.new("L", (9000, 9000), 128).save(f["huge_png"], optimize=False)
    f["big_file_png"] = d / "noise-26mb.png"  # > Limits.max_upload_mb (25 MB), < Gradio's max_file_size (100 MB)
    noise = np.random.default_rng(0).integers(0, 256, size=(3000, 3000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(f["big_file_png"], compress_level=0)
    f["run_txt"] = d / "not-a-run.txt"
    f["run_txt"].write_text("{}")
    src = (RUNS / "01-snapkv.mmkvrun").read_bytes()
    f["run_truncated"] = d / "truncated.mmkvrun"
    f["run_truncated"].write_bytes(src[: len(src) // 2])
    f["run_garbage"] = d / "garbage.mmkvrun"
    f["run_garbage"].write_bytes(bytes(rnd.getrandbits(8) for _ in range(8192)))
    f["run_empty"] = d / "empty.mmkvrun"
    f["run_empty"].write_bytes(b"")
    f["run_png"] = d / "picture.mmkvrun"
    f["run_png"].write_bytes((EXAMPLES / "needle_1.png").read_bytes())
    return f


# ---- one request -----------------------------------------------------------------------------
#: where each endpoint's status message is in its outputs
STATUS_INDEX = {
    "/on_chat": 2,
    "/on_compare": 0,
    "/on_compare_saved": 0,
    "/on_inspect": 0,
    "/on_replay": 0,
    "/on_open_runs": 0,
    "/on_preview": None,
}


def leaked_paths(text: str, extra: list[str]) -> list[str]:
    found = set(PATH_RE.findall(text or ""))
    found |= {p for p in extra if p and p in (text or "")}
    return sorted(found)


def call(app: App, c: Any, name: str, tab: str, api: str, args: list[Any], extra_paths: list[str]) -> dict[str, Any]:
    from gradio_client.exceptions import AppError

    before = app.log_size()
    t = time.perf_counter()
    rec: dict[str, Any] = {"name": name, "tab": tab, "api": api}
    try:
        out = c.predict(*args, api_name=api)
        rec["served"] = True
        i = STATUS_INDEX[api]
        message = out if i is None else (out[i] if isinstance(out, (list, tuple)) else out)
        message = "" if message is None else str(message)
        rec["error_kind"] = None
    except AppError as exc:
        rec["served"] = False
        message = str(exc)
        rec["error_kind"] = "AppError"
    except Exception as exc:  # noqa: BLE001 - recorded
        rec["served"] = False
        message = f"{type(exc).__name__}: {exc}"
        rec["error_kind"] = type(exc).__name__
    rec["seconds"] = round(time.perf_counter() - t, 2)
    time.sleep(0.15)  # let the app's log catch up
    new_log = app.log_since(before)
    rec["clear"] = rec["served"] and message.startswith("⚠️")
    rec["message"] = message[:160]
    rec["path_leak"] = leaked_paths(message, extra_paths)
    rec["traceback_logged"] = "Traceback" in new_log
    rec["tracebacks"] = new_log.count("Traceback")  # a chained exception prints two
    rec["app_alive"] = app.alive()
    # Gradio refused the value in a component's preprocess (the handler never ran); the log shows where
    rec["gradio_validation"] = (not rec["served"]) and bool(
        re.search(
            r"gradio/components/\w+\.py\", line \d+, in (preprocess|_preprocess|_process_single_file)|"
            r"raise_if_out_of_bounds|not in the list of choices|Could not preprocess input component|"
            r"Invalid file type|validation error for \w+Data",
            new_log + message,
        )
    )
    if rec["traceback_logged"]:
        last = [ln for ln in new_log.splitlines() if ln.strip()]
        frames = [ln.strip() for ln in last if ln.strip().startswith("File ")]
        rec["log_tail"] = (frames[-1] + " | " if frames else "") + (last[-1][:200] if last else "")
    rec["crash"] = (not rec["served"]) or rec["traceback_logged"] or not rec["app_alive"]
    return rec


class RawClient:
    """POSTs to Gradio's ``/gradio_api/call/<api>`` with a hand-made JSON body (``NaN`` included, which
    gradio_client refuses to encode) and reads the event stream; ``predict`` mimics gradio_client's."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/gradio_api/call"

    def predict(self, *args: Any, api_name: str) -> Any:
        import httpx
        from gradio_client.exceptions import AppError

        body = json.dumps({"data": list(args)}, allow_nan=True)
        r = httpx.post(self.url + api_name, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        r.raise_for_status()
        event_id = r.json()["event_id"]
        event, last = None, None
        with httpx.stream("GET", f"{self.url}{api_name}/{event_id}", timeout=300) as resp:
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = json.loads(line.split(":", 1)[1].strip() or "null")
                    if event == "error":
                        raise AppError(str(data) if data is not None else "the server returned an error (no message)")
                    if event == "complete":
                        return data
                    last = data
        return last


def chat_answer(out: Any) -> str:
    """The assistant's last answer from /on_chat's outputs."""
    conv = out[0] if isinstance(out, (list, tuple)) else []
    for m in reversed(conv or []):
        if m.get("role") == "assistant":
            content = m.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


# ---- the bad inputs --------------------------------------------------------------------------
def bad_inputs(app: App, files: dict[str, Path], extra_paths: list[str]) -> tuple[list[dict[str, Any]], bool, str]:
    from gradio_client import handle_file

    ex = json.loads((EXAMPLES / "examples.json").read_text())[0]
    q = "What is in the image?"

    def m(text: str = q, paths: list[str | Path] = ()) -> dict[str, Any]:
        return {"text": text, "files": [handle_file(str(p)) for p in paths]}

    good = m(q, [EXAMPLES / "needle_1.png"])

    # on_chat: message, method, ratio, tokens, query_aware, max_new_tokens, num_frames, params
    def chat(message=None, method="snapkv", ratio=0.3, tokens=0, qa=True, new=8, frames=4, params=""):
        return [good if message is None else message, method, ratio, tokens, qa, new, frames, params]

    # on_compare: message, methods, ratio, tokens, sweep, query_aware, max_new_tokens, num_frames, with_kl
    def cmp(
        message=None, methods=("full", "snapkv"), ratio=0.3, tokens=0, sweep="", qa=True, new=4, frames=4, kl=False
    ):
        return [good if message is None else message, list(methods), ratio, tokens, sweep, qa, new, frames, kl]

    long_digits = " ".join(str(i) for i in range(4000))[:19_000]  # < 20,000 chars, far beyond 4,096 tokens
    all_methods = ["adakv", "full", "h2o", "hybridkv", "lookm", "madakv", "meda", "pyramidkv", "snapkv", "streamingllm"]
    cases: list[tuple[str, str, str, Callable[[], list[Any]]]] = [
        # ---- Chat ----
        ("chat: empty prompt", "Chat", "/on_chat", lambda: chat(m(""))),
        ("chat: whitespace-only prompt", "Chat", "/on_chat", lambda: chat(m("   \n\t "))),
        ("chat: 150,000-char prompt (> max_prompt_chars)", "Chat", "/on_chat", lambda: chat(m("word " * 30_000))),
        ("chat: 19,000-char prompt beyond the 4,096-token context", "Chat", "/on_chat", lambda: chat(m(long_digits))),
        ("chat: budget ratio 0", "Chat", "/on_chat", lambda: chat(ratio=0)),
        ("chat: budget ratio 1.5", "Chat", "/on_chat", lambda: chat(ratio=1.5)),
        ("chat: budget ratio -0.2", "Chat", "/on_chat", lambda: chat(ratio=-0.2)),
        ("chat: budget ratio 'abc'", "Chat", "/on_chat", lambda: chat(ratio="abc")),
        ("chat: token budget -3", "Chat", "/on_chat", lambda: chat(tokens=-3)),
        ("chat: token budget 2.5", "Chat", "/on_chat", lambda: chat(tokens=2.5)),
        ("chat: unknown method 'bogus'", "Chat", "/on_chat", lambda: chat(method="bogus")),
        ("chat: empty method", "Chat", "/on_chat", lambda: chat(method="")),
        ("chat: hyper-parameters not JSON", "Chat", "/on_chat", lambda: chat(params="{window: 32,")),
        ("chat: hyper-parameters JSON list", "Chat", "/on_chat", lambda: chat(params="[1, 2]")),
        ("chat: unknown hyper-parameter key", "Chat", "/on_chat", lambda: chat(params='{"no_such_key": 1}')),
        ("chat: hyper-parameter window -5", "Chat", "/on_chat", lambda: chat(params='{"window": -5}')),
        ("chat: hyper-parameter window 'abc'", "Chat", "/on_chat", lambda: chat(params='{"window": "abc"}')),
        ("chat: hyper-parameter pooling 'cubic'", "Chat", "/on_chat", lambda: chat(params='{"pooling": "cubic"}')),
        ("chat: max new tokens 0", "Chat", "/on_chat", lambda: chat(new=0)),
        ("chat: max new tokens 10^6", "Chat", "/on_chat", lambda: chat(new=10**6)),
        ("chat: max new tokens 2.5", "Chat", "/on_chat", lambda: chat(new=2.5)),
        ("chat: frames 0 (with a video)", "Chat", "/on_chat", lambda: chat(m(q, [EXAMPLES / "ball.webm"]), frames=0)),
        (
            "chat: frames 999 (with a video)",
            "Chat",
            "/on_chat",
            lambda: chat(m(q, [EXAMPLES / "ball.webm"]), frames=999),
        ),
        ("chat: unsupported file type .txt", "Chat", "/on_chat", lambda: chat(m(q, [files["txt"]]))),
        ("chat: empty (0-byte) .png", "Chat", "/on_chat", lambda: chat(m(q, [files["empty_png"]]))),
        ("chat: corrupt PNG (random bytes)", "Chat", "/on_chat", lambda: chat(m(q, [files["corrupt_png"]]))),
        ("chat: truncated PNG (first 200 bytes)", "Chat", "/on_chat", lambda: chat(m(q, [files["truncated_png"]]))),
        ("chat: corrupt video (random bytes .mp4)", "Chat", "/on_chat", lambda: chat(m(q, [files["corrupt_mp4"]]))),
        ("chat: empty (0-byte) .mp4", "Chat", "/on_chat", lambda: chat(m(q, [files["empty_mp4"]]))),
        ("chat: 9000x9000 PNG (81 MP > 40 MP limit)", "Chat", "/on_chat", lambda: chat(m(q, [files["huge_png"]]))),
        ("chat: 26 MB PNG (> 25 MB upload limit)", "Chat", "/on_chat", lambda: chat(m(q, [files["big_file_png"]]))),
        (
            "chat: 9 images (> 8)",
            "Chat",
            "/on_chat",
            lambda: chat(m(q, [EXAMPLES / f"needle_{i % 8 + 1}.png" for i in range(9)])),
        ),
        ("chat: 3 videos (> 2)", "Chat", "/on_chat", lambda: chat(m(q, [EXAMPLES / "ball.webm"] * 3))),
        ("chat: message a plain string, not {text, files}", "Chat", "/on_chat", lambda: chat("hello")),
        # ---- Compare ----
        ("compare: only Full", "Compare", "/on_compare", lambda: cmp(methods=["full"])),
        ("compare: no methods", "Compare", "/on_compare", lambda: cmp(methods=[])),
        ("compare: unknown method in the list", "Compare", "/on_compare", lambda: cmp(methods=["full", "bogus"])),
        ("compare: sweep '0.1, abc'", "Compare", "/on_compare", lambda: cmp(sweep="0.1, abc")),
        ("compare: sweep '0, 2' (out of range)", "Compare", "/on_compare", lambda: cmp(sweep="0, 2")),
        (
            "compare: 37 runs (> 24: 9 methods x 4 budgets + Full)",
            "Compare",
            "/on_compare",
            lambda: cmp(methods=all_methods, sweep="0.1, 0.2, 0.4"),
        ),
        ("compare: budget ratio 0", "Compare", "/on_compare", lambda: cmp(ratio=0)),
        ("compare: token budget 2.5", "Compare", "/on_compare", lambda: cmp(tokens=2.5)),
        ("compare: max new tokens 0", "Compare", "/on_compare", lambda: cmp(new=0)),
        ("compare: frames 999", "Compare", "/on_compare", lambda: cmp(m(q, [EXAMPLES / "ball.webm"]), frames=999)),
        ("compare: empty prompt", "Compare", "/on_compare", lambda: cmp(m(""))),
        ("compare: unsupported file type .txt", "Compare", "/on_compare", lambda: cmp(m(q, [files["txt"]]))),
        ("compare: corrupt PNG", "Compare", "/on_compare", lambda: cmp(m(q, [files["corrupt_png"]]))),
        ("compare saved: nothing chosen", "Compare", "/on_compare_saved", lambda: [[], []]),
        (
            "compare saved: a .txt file as a run",
            "Compare",
            "/on_compare_saved",
            lambda: [[handle_file(str(files["run_txt"]))], []],
        ),
        (
            "compare saved: truncated .mmkvrun (first half)",
            "Compare",
            "/on_compare_saved",
            lambda: [[handle_file(str(files["run_truncated"]))], []],
        ),
        (
            "compare saved: a PNG renamed .mmkvrun",
            "Compare",
            "/on_compare_saved",
            lambda: [[handle_file(str(files["run_png"]))], []],
        ),
        ("compare saved: unknown example run name", "Compare", "/on_compare_saved", lambda: [[], ["99-nope.mmkvrun"]]),
        # ---- Inspect (open runs) ----
        ("inspect open: nothing chosen", "Inspect", "/on_open_runs", lambda: [[], []]),
        (
            "inspect open: a .txt file as a run",
            "Inspect",
            "/on_open_runs",
            lambda: [[handle_file(str(files["run_txt"]))], []],
        ),
        (
            "inspect open: truncated .mmkvrun (first half)",
            "Inspect",
            "/on_open_runs",
            lambda: [[handle_file(str(files["run_truncated"]))], []],
        ),
        (
            "inspect open: random-bytes .mmkvrun",
            "Inspect",
            "/on_open_runs",
            lambda: [[handle_file(str(files["run_garbage"]))], []],
        ),
        (
            "inspect open: empty .mmkvrun",
            "Inspect",
            "/on_open_runs",
            lambda: [[handle_file(str(files["run_empty"]))], []],
        ),
        ("inspect open: unknown example run name", "Inspect", "/on_open_runs", lambda: [[], ["99-nope.mmkvrun"]]),
    ]
    details: list[dict[str, Any]] = []
    c = client(app.url)
    for name, tab, api, make in cases:
        details.append(call(app, c, name, tab, api, make(), extra_paths))
    # NaN: gradio_client will not encode it (json allow_nan=False), a hand-made request can; text-only message
    raw = RawClient(app.url)
    text_only = {"text": q, "files": []}
    nan = float("nan")
    for name, api, args in [
        ("chat: budget ratio NaN (raw HTTP)", "/on_chat", chat(text_only, ratio=nan)),
        ("chat: token budget NaN (raw HTTP)", "/on_chat", chat(text_only, tokens=nan)),
        ("chat: max new tokens NaN (raw HTTP)", "/on_chat", chat(text_only, new=nan)),
        ("chat: frames NaN (raw HTTP)", "/on_chat", chat(text_only, frames=nan)),
        ("compare: budget ratio NaN (raw HTTP)", "/on_compare", cmp(text_only, ratio=nan)),
    ]:
        details.append(call(app, raw, name, "Chat" if api == "/on_chat" else "Compare", api, args, extra_paths))

    # Inspect on a fresh session (no runs), then on a session holding the shipped example run
    c2 = client(app.url)
    details.append(
        call(
            app,
            c2,
            "inspect: nothing to inspect yet (no runs)",
            "Inspect",
            "/on_inspect",
            [None, "all layers", "all KV heads", 0.5],
            extra_paths,
        )
    )
    opened = c2.predict([], ["01-snapkv.mmkvrun"], api_name="/on_open_runs")
    label = opened[1] if isinstance(opened, (list, tuple)) else None
    if isinstance(label, dict):  # the run dropdown comes back as an update: {"choices": ..., "value": ...}
        label = label.get("value")
    try:  # what the browser does on a new run: the layer / head lists and the replay slider get the run's shape
        c2.predict(label, 0.5, api_name="/on_run_change")
    except Exception as exc:  # noqa: BLE001
        print(f"note: /on_run_change failed: {exc}", file=sys.stderr)
    inspect_cases = [
        ("inspect: unknown run name", "/on_inspect", ["no such run", "all layers", "all KV heads", 0.5]),
        ("inspect: layer 'layer 99'", "/on_inspect", [label, "layer 99", "all KV heads", 0.5]),
        ("inspect: head 'KV head 99'", "/on_inspect", [label, "all layers", "KV head 99", 0.5]),
        ("inspect: layer 'banana'", "/on_inspect", [label, "banana", "all KV heads", 0.5]),
        ("inspect: fade alpha 5", "/on_inspect", [label, "all layers", "all KV heads", 5]),
        ("replay: step -5", "/on_replay", [label, -5, "all layers", "all KV heads"]),
        ("replay: step 'x'", "/on_replay", [label, "x", "all layers", "all KV heads"]),
        ("replay: unknown run name", "/on_replay", ["no such run", 0, "all layers", "all KV heads"]),
        ("replay: head 'KV head 99'", "/on_replay", [label, 0, "all layers", "KV head 99"]),
    ]
    for name, api, args in inspect_cases:
        details.append(call(app, c2, name, "Inspect", api, args, extra_paths))

    # still serving: a good chat on a fresh session
    c3 = client(app.url)
    msg = {"text": ex["text"], "files": [handle_file(str(EXAMPLES / f)) for f in ex["files"]]}
    try:
        out = c3.predict(msg, ex["method"], ex["budget"], 0, True, 16, 8, "", api_name="/on_chat")
        answer = chat_answer(out)
        serving = app.alive() and str(out[2]).startswith("Done") and answer.strip() == ex["answer"].strip()
    except Exception as exc:  # noqa: BLE001
        answer, serving = f"{type(exc).__name__}: {exc}", False
    return details, serving, answer


# ---- concurrency -----------------------------------------------------------------------------
def concurrent(app: App, n: int, queue_size: int) -> dict[str, Any]:
    from gradio_client import handle_file

    ex = json.loads((EXAMPLES / "examples.json").read_text())[0]
    with ThreadPoolExecutor(8) as pool:  # one client (session) per request, made before the clock starts
        clients = list(pool.map(lambda _: client(app.url), range(n)))
    before = app.log_size()
    barrier = threading.Barrier(n)

    def one(c: Any) -> dict[str, Any]:
        msg = {"text": ex["text"], "files": [handle_file(str(EXAMPLES / f)) for f in ex["files"]]}
        barrier.wait()
        t = time.perf_counter()
        try:
            out = c.submit(msg, "snapkv", 0.3, 0, True, 16, 8, "", api_name="/on_chat").result(timeout=1800)
            return {"ok": True, "s": time.perf_counter() - t, "answer": chat_answer(out), "status": str(out[2])[:120]}
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "s": time.perf_counter() - t, "error": f"{type(exc).__name__}: {exc}"[:200]}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, clients))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    queue_full = [r for r in failed if "queue is full" in r["error"].lower() or "queue_full" in r["error"].lower()]
    wrong = [r for r in ok if r["answer"].strip() != ex["answer"].strip()]
    lat = sorted(r["s"] for r in ok)
    errors: dict[str, int] = {}
    for r in failed:
        errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {
        "requests": n,
        "queue_max_size": queue_size,
        "served": len(ok),
        "failed": len(failed),
        "rejected_queue_full": len(queue_full),
        "other_failures": len(failed) - len(queue_full),
        "wall_s": round(wall, 1),
        "served_per_s": round(len(ok) / wall, 2) if wall else None,
        "latency_s": {"min": round(lat[0], 1), "median": round(lat[len(lat) // 2], 1), "max": round(lat[-1], 1)}
        if lat
        else None,
        "answers_equal_example": len(ok) - len(wrong),
        "wrong_answers": [r["answer"][:80] for r in wrong][:5],
        "errors": errors,
        "traceback_logged": "Traceback" in app.log_since(before),
        "app_alive": app.alive(),
    }


# ---- main ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrent", type=int, default=64)
    ap.add_argument("--skip-default-queue", action="store_true", help="skip the run with the default queue size (16)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmkv-robust-"))
    extra_paths = [str(work), str(ROOT), str(Path.home()), tempfile.gettempdir() + "/gradio"]
    result: dict[str, Any] = {}
    app = None
    try:
        files = make_files(work)
        app = App(work, queue_size=128, name="q128")
        result["app_start_s"] = round(app.start_s, 1)
        details, serving, answer = bad_inputs(app, files, extra_paths)
        conc = {"queue_128": concurrent(app, args.concurrent, 128)}
        alive = app.alive()
        tb_total = app.log().count("Traceback")
        app.stop()
        if not args.skip_default_queue:
            app = App(work, queue_size=None, name="q16")
            conc["queue_default_16"] = concurrent(app, args.concurrent, 16)
            conc["queue_default_16"]["note"] = (
                "Gradio's queue holds at most max_size waiting events (queue_kwargs: MMKV_QUEUE_SIZE, default 16); "
                "a request arriving while it is full gets a 'queue_full' message and gradio_client raises "
                "QueueError('Queue is full! Please try again.'). Served ones are those that found room, including "
                "those admitted as earlier ones finished."
            )
            app.stop()
        result.update(
            {
                "bad_inputs": len(details),
                "clear_messages": sum(d["clear"] for d in details),
                "crashes": sum(d["crash"] for d in details),
                "crashes_gradio_validation": sum(d["crash"] and d["gradio_validation"] for d in details),
                "crashes_other": sum(d["crash"] and not d["gradio_validation"] for d in details),
                "served_without_clear_message": sum(d["served"] and not d["clear"] for d in details),
                "tracebacks_logged": sum(d["traceback_logged"] for d in details),
                "paths_leaked": sum(bool(d["path_leak"]) for d in details),
                "app_alive_after_bad_inputs": alive,
                "tracebacks_in_app_log_total": tb_total,
                "still_serving": serving,
                "still_serving_answer": answer[:120],
                "concurrent": conc,
                "details": details,
            }
        )
    finally:
        if app is not None:
            app.stop()
        keep = os.environ.get("MMKV_KEEP_ROBUST_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for log in work.glob("app-*.log"):
                shutil.copy(log, keep)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    c128 = result["concurrent"]["queue_128"]
    c16 = result["concurrent"].get("queue_default_16")
    print(
        f"summary: {result['bad_inputs']} bad inputs, {result['clear_messages']} clear messages, "
        f"{result['crashes']} crashes ({result['crashes_gradio_validation']} refused by Gradio's own validation), "
        f"{result['paths_leaked']} path leaks, still serving: {result['still_serving']}; "
        f"{c128['requests']} concurrent chats (queue 128): {c128['served']} served, {c128['failed']} failed, "
        f"{c128['answers_equal_example']} correct answers in {c128['wall_s']} s"
        + (f"; queue 16: {c16['served']} served, {c16['rejected_queue_full']} refused 'queue full'" if c16 else "")
    )


if __name__ == "__main__":
    main()
