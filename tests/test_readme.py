"""Every command the README shows is run here, as written or mirrored at a small size.

The README's ``bash`` blocks are parsed; each command must have an entry in :data:`MIRRORS` (a README
command without a test fails :func:`test_every_readme_command_has_a_mirror`, and so does a mirror
whose command left the README). Commands that fit a CPU run as written; the others run with smaller
sizes, or — for the GPU-only benchmark and the multi-hour training chain — are checked as far as a
CPU allows (the published shape built on the meta device; every training stage's arguments parsed by
the trainer). The README's Python block is executed as written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent
NEEDLE_ANSWER = "The orange circle is in image 1."


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def _run(argv: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _mmkv(args: str) -> list[str]:
    """``mmkv ARGS`` through the console script installed next to this interpreter."""
    script = BIN / "mmkv"
    assert script.is_file(), f"the installed command {script} is missing (pip install -e . / pip install .)"
    return [str(script), *shlex.split(args)]


def _workdir(tmp_path: Path) -> Path:
    """A folder outside the checkout where README paths like ``mmkv/assets/examples/...`` resolve."""
    (tmp_path / "mmkv").mkdir()
    (tmp_path / "mmkv" / "assets").symlink_to(ROOT / "mmkv" / "assets")
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serves(argv: list[str], cwd: Path, port: int, logs: Path, timeout: float = 240, **env: str) -> str:
    """Start a server command, wait until the app answers on ``port``, stop it; returns its output."""
    log = logs / f"server-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=_env(**env), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{argv} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    if page.status == 200 and b"gradio" in page.read().lower():
                        return log.read_text()
            except OSError:
                time.sleep(1)
        pytest.fail(f"{argv} did not serve http://127.0.0.1:{port} within {timeout} s:\n{log.read_text()[-3000:]}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    raise AssertionError("unreachable")


# ---- mirrors ----------------------------------------------------------------------------------------
def run_sh(tmp_path: Path) -> None:
    port = _free_port()
    out = _serves(["bash", str(ROOT / "scripts" / "run.sh")], ROOT, port, tmp_path, GRADIO_SERVER_PORT=str(port))
    assert "mmkv app: model" in out and "ready" in out
    assert "HTTP Request" not in out, "httpx request logs clutter run.sh"


def ci_runs_test_sh(tmp_path: Path) -> None:
    # The test command is what CI runs: .ci/run must call it (running it here would recurse).
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def pip_install(tmp_path: Path) -> None:
    """The wheel carries the model, the examples and the app: installed in a bare folder, used from another."""
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        tmp_path,
    )
    (wheel,) = wheels.glob("mmkv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "mmkv/assets/mmkv-tiny-qwen2vl/model.safetensors",
        "mmkv/assets/mmkv-tiny-qwen2vl/chat_template.jinja",
        "mmkv/assets/examples/examples.json",
        "mmkv/assets/examples/needle_1.png",
        "mmkv/app.py",
        "viz/overlay.py",
    ):
        assert name in names, f"{name} is not in the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mmkv = mmkv.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    examples = site / "mmkv" / "assets" / "examples"
    code = (
        "import sys, mmkv; assert mmkv.__file__.startswith(sys.argv[1]), mmkv.__file__; "
        "from mmkv.cli import main; sys.exit(main(['run', '--method', 'full', '--max-new-tokens', '16', "
        "'--prompt', 'Which image has the orange circle?'] + sum([['--image', f'{sys.argv[2]}/needle_{i}.png'] "
        "for i in (1, 2, 3)], [])))"
    )
    # -I: isolated (no checkout, no user site); the bare folder is put first on the path by hand
    out = _run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}", str(site), str(examples)],
        elsewhere,
    )
    assert out.stdout.splitlines()[0] == NEEDLE_ANSWER
    port = _free_port()
    _serves(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(site)!r}); from mmkv.cli import main; "
            f"sys.exit(main(['app', '--port', '{port}']))",
        ],
        elsewhere,
        port,
        tmp_path,
        MMKV_MODEL="",
    )


def mmkv_run_full(tmp_path: Path) -> None:
    command = next(c for c in readme_commands() if c.startswith("mmkv run") and "--method full" in c)
    out = _run(_mmkv(command.removeprefix("mmkv ")), _workdir(tmp_path))
    assert out.stdout.splitlines()[0] == NEEDLE_ANSWER
    assert "prompt tokens:" in out.stdout and "KV bytes:" in out.stdout


def mmkv_run_trace(tmp_path: Path) -> None:
    command = next(c for c in readme_commands() if c.startswith("mmkv run") and "--trace" in c)
    cwd = _workdir(tmp_path)
    out = _run(_mmkv(command.removeprefix("mmkv ")), cwd)
    trace = json.loads((cwd / "trace.json").read_text())
    assert trace["method"] == "adakv" and trace["budget"] == 0.3 and "trace written to trace.json" in out.stdout
    assert len(trace["generated_ids"]) >= 1
    answer = out.stdout.splitlines()[0]  # the README: AdaKV at 30% evicts the circle and names another image
    assert answer.startswith("The orange circle is in image ") and answer != "The orange circle is in image 1.", answer
    import mmkv

    run = mmkv.load_run(cwd / "needle.mmkvrun")  # the same run, with thumbnails and tokens, opens without the model
    assert run.trace.to_dict() == trace and len(run.images) == 3 and len(run.tokens) == trace["prompt_length"]


def mmkv_methods(tmp_path: Path) -> None:
    from mmkv import METHODS

    out = _run(_mmkv("methods"), tmp_path)
    assert all(re.search(rf"^{name}\s", out.stdout, re.M) for name in METHODS)


def mmkv_app(tmp_path: Path) -> None:
    port = _free_port()
    out = _serves(_mmkv(f"app --port {port}"), tmp_path, port, tmp_path, MMKV_MODEL="")
    assert (
        "model `bundled`" in out
    )  # the bundled model, found from a folder outside the checkout (shown by name, not path)


def bench_default(tmp_path: Path) -> None:
    out = _run(_mmkv("bench"), tmp_path)
    rows = json.loads((tmp_path / "bench-results" / "bench.json").read_text())
    from mmkv import METHODS

    assert {r["method"] for r in rows} == set(METHODS) and rows[0]["method"] == "full" and rows[0]["kv_ratio"] == 1.0
    assert "cells done" in out.stderr and "ETA" in out.stderr and "| full |" in out.stdout


def bench_tiny_wide(tmp_path: Path) -> None:
    # as written it runs every method at 3k and 8k tokens (minutes); here one method at 400 tokens
    _run(
        [
            *_mmkv("bench"),
            "--model",
            "tiny-wide",
            "--budgets",
            "0.2",
            "--contexts",
            "400",
            "--methods",
            "snapkv",
            "--new-tokens",
            "2",
            "--warmup",
            "1",
        ],
        tmp_path,
    )
    rows = json.loads((tmp_path / "bench-results" / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["full", "snapkv"] and abs(rows[1]["kv_ratio"] - 0.2) < 0.02


def bench_gpu_shape(tmp_path: Path) -> None:
    """The published Qwen2.5-VL-7B shape is built (on the meta device: no memory) and has its 8.3B parameters."""
    import torch

    from mmkv.experiments import bench

    model = bench.build_shape("qwen2.5-vl-7b", "meta", torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < params < 8.6e9, params
    assert model.config.text_config.num_key_value_heads == 4 and model.config.text_config.num_hidden_layers == 28


def train_chain(tmp_path: Path) -> None:
    """Every stage of the chain parses with the trainer's own argument parser (the chain takes hours)."""
    from training.tiny.train import build_parser

    script = (ROOT / "scripts" / "train_tiny.sh").read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)=(\S+)$", script, re.M))
    arrays = {k: v for k, v in re.findall(r"^(\w+)=\((.*)\)$", script, re.M)}
    calls = re.findall(r"\|\| train (.*)$", script, re.M)
    assert len(calls) >= 10
    for call in calls:
        call = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: arrays[m.group(1)], call)
        call = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), "x"), call)
        build_parser().parse_args(["--threads", "2", "--eval-n", "64", *shlex.split(call)])


def v2_chain_stages() -> list[tuple[str, str, list[str]]]:
    """``scripts/train_tiny_v2.sh``'s stages as (name, input stage, trainer arguments), arrays and variables expanded."""
    script = (ROOT / "scripts" / "train_tiny_v2.sh").read_text().replace("\\\n", " ")
    script = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    variables = dict(re.findall(r"^(\w+)=([^(\s]\S*)$", script, re.M))
    arrays = dict(re.findall(r"^(\w+)=\((.*?)\)\s*$", script, re.M | re.S))

    def expand(text: str) -> str:
        text = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: expand(arrays[m.group(1)]), text)
        return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], text)

    stages = re.findall(r"^stage (\w+) (\w+) (.*)$", script, re.M)
    return [(name, source, shlex.split(expand(rest))) for name, source, rest in stages]


def train_chain_v2(tmp_path: Path) -> None:
    """The v2 chain (hours of CPU) as far as a test can: every stage in the script is committed in
    training/tiny-v2/ and ran with exactly the script's arguments (its recorded args.json, parsed by the
    trainer's own parser), each from the stage before it, back to g0 (grown from v1); the last one is the
    bundled model, byte for byte."""
    from training.tiny.train import build_parser, resolve_defaults

    stages = v2_chain_stages()
    assert [s[0] for s in stages][:1] == ["s1"] and len(stages) >= 7
    previous = "g0"
    for name, source, argv in stages:
        assert source == previous, (name, source)
        fixed = ["--arch", "v2", "--threads", "2", "--eval-n", "64", "--init", f"training/tiny-v2/{source}"]
        fixed += ["--work", f".cache/tiny-v2/{name}", "--stage-out", f"training/tiny-v2/{name}"]
        parsed = vars(resolve_defaults(build_parser().parse_args([*fixed, *argv])))
        recorded = json.loads((ROOT / "training" / "tiny-v2" / name / "args.json").read_text())
        assert {k: parsed[k] for k in recorded} == recorded, name
        previous = name
    bundled = json.loads((ROOT / "mmkv" / "assets" / "mmkv-tiny-qwen2vl" / "training_metrics.json").read_text())
    assert bundled["stage"] == previous and [c["stage"] for c in bundled["chain"]] == ["g0", *[s[0] for s in stages]]
    shipped = (ROOT / "mmkv" / "assets" / "mmkv-tiny-qwen2vl" / "model.safetensors").read_bytes()
    assert shipped == (ROOT / "training" / "tiny-v2" / previous / "model.safetensors").read_bytes()


def ship_tiny(tmp_path: Path) -> None:
    """The README's ship command verifies the stage and writes the bundled folder; here into a temporary folder,
    3 held-out samples per task: the same model bytes, suite and shipped tasks as the bundled model."""
    stage = "training/tiny-v2/v1"
    out = tmp_path / "model"
    _run([sys.executable, "scripts/ship_tiny.py", stage, "--out", str(out), "--samples", "3", "--threads", "1"], ROOT)
    bundled = ROOT / "mmkv" / "assets" / "mmkv-tiny-qwen2vl"
    assert (out / "model.safetensors").read_bytes() == (bundled / "model.safetensors").read_bytes()
    ours, theirs = (json.loads((d / "training_metrics.json").read_text()) for d in (out, bundled))
    assert ours["suite"] == theirs["suite"] and ours["n_per_task"] == 3
    assert set(ours["shipped_tasks"]) >= {
        "needle"
    }  # 3 samples decide little; the bundled model's 100 are tested elsewhere


def eval_synthetic(tmp_path: Path) -> None:
    """As written: the CPU defaults (Full + 4 methods, 5 samples per task) at two budgets."""
    out = _run([*_mmkv("eval"), "--model", "bundled", "--budgets", "0.1,0.2", "--out", "eval-results"], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "eval-results" / "results.jsonl").read_text().splitlines()]
    cells = [r for r in records if r.get("kind") == "cell"]
    assert {r["method"] for r in cells} == {"full", "snapkv", "adakv", "lookm", "madakv"}
    assert all(len(r["samples"]) == 5 and all("token_ids" in x for x in r["samples"]) for r in cells)
    needle_full = [x["score"] for r in cells if r["method"] == "full" and r["task"] == "needle" for x in r["samples"]]
    assert needle_full == [1.0] * 5  # the bundled model's shipped task, answered with Full
    assert "cells done" in out.stderr and "ETA" in out.stderr


def eval_report(tmp_path: Path) -> None:
    _run(
        [
            *_mmkv("eval"),
            "--model",
            "bundled",
            "--tasks",
            "needle",
            "--samples",
            "2",
            "--methods",
            "snapkv",
            "--budgets",
            "0.2",
            "--out",
            "eval-results",
        ],
        tmp_path,
    )
    _run([*_mmkv("eval"), "--report", "eval-results/results.jsonl", "--out", "report"], tmp_path)
    rows = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert {r["method"] for r in rows} == {"full", "snapkv"} and (tmp_path / "report" / "eval.html").is_file()


def eval_milebench(tmp_path: Path) -> None:
    """On CPU: a two-sample MileBench-format folder, the bundled model, no Ray (tests/test_ray_sweep.py runs Ray)."""
    from mmkv.tiny.tasks import suite_of
    from test_milebench import write_dataset

    data = tmp_path / "data" / "MileBench"
    write_dataset(
        data,
        "TextNeedleInAHaystack",
        suite_of("bundled").heldout("text_needle", 2, 3, seed=7),
        response=lambda s: s.scene.password,
    )
    _run(
        [
            *_mmkv("eval"),
            "--model",
            "bundled",
            "--milebench",
            str(data),
            "--datasets",
            "TextNeedleInAHaystack",
            "--samples",
            "2",
            "--methods",
            "full,snapkv",
            "--budgets",
            "0.2",
            "--max-new-tokens",
            "12",
            "--out",
            "eval-results/milebench",
        ],
        tmp_path,
    )
    rows = json.loads((tmp_path / "eval-results" / "milebench" / "eval.json").read_text())
    full = next(r for r in rows if r["method"] == "full")
    assert full["samples"] == 2 and full["accuracy"] == 1.0


def lmms_eval(tmp_path: Path) -> None:
    """lmms-eval finds the model through the package's entry point (the plugin's logic: tests/test_lmms_plugin.py)."""
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "mmkv"]
    assert entry.value == "mmkv.integrations.lmms_eval:manifest"
    import mmkv.integrations.lmms_eval as plugin

    assert callable(plugin.manifest)


MIRRORS: dict[str, Callable[[Path], None]] = {
    "bash scripts/run.sh": run_sh,
    "bash scripts/test.sh": ci_runs_test_sh,
    'pip install ".[app]"': pip_install,
    "mmkv methods": mmkv_methods,
    "mmkv app": mmkv_app,
    "mmkv bench": bench_default,
    "mmkv bench --model tiny-wide --budgets 0.2": bench_tiny_wide,
    "mmkv bench --model qwen2.5-vl-7b --contexts 8192,32768,65536 --budgets 0.1,0.2": bench_gpu_shape,
    "bash scripts/train_tiny.sh .cache/tiny-replay/model": train_chain,
    "bash scripts/train_tiny_v2.sh": train_chain_v2,
    "python scripts/ship_tiny.py training/tiny-v2/v1": ship_tiny,
    "mmkv eval --model bundled --budgets 0.1,0.2 --out eval-results": eval_synthetic,
    "mmkv eval --report eval-results/results.jsonl --out report": eval_report,
}
for _command in readme_commands():
    if _command.startswith("mmkv eval") and "--milebench" in _command:
        MIRRORS[_command] = eval_milebench
    elif _command.startswith("lmms-eval"):
        MIRRORS[_command] = lmms_eval
    elif _command.startswith("mmkv run") and "--method full" in _command:
        MIRRORS[_command] = mmkv_run_full
    elif _command.startswith("mmkv run") and "--trace" in _command:
        MIRRORS[_command] = mmkv_run_trace


def test_every_readme_command_has_a_mirror() -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    assert sorted(set(commands) - set(MIRRORS)) == [], "README commands without a test here"
    assert sorted(set(MIRRORS) - set(commands)) == [], "tests here for commands the README no longer shows"


@pytest.mark.parametrize("command", sorted(MIRRORS), ids=lambda c: re.sub(r"[^\w.,=-]+", "_", c)[:70])
def test_readme_command(command: str, tmp_path: Path) -> None:
    MIRRORS[command](tmp_path)


def test_readme_python_block_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    block = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("The orange circle is in image") and "'kv_bytes_compressed'" in lines[0]
    assert lines[1].startswith("The orange circle is in image")  # the stream
    assert abs(float(lines[-1]) - 0.2) < 0.02  # H2O's kept share around plain model.generate


def test_readme_multi_turn_block_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "Conversation" in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("The orange circle is in image")
    text, prefilled, held = lines[1].rsplit(" ", 2)
    assert 0 < int(prefilled) < 40 and int(held) > 0  # the follow-up read only its own tokens
    assert scope["conv"].cache is None and scope["conv"].cache_bytes == 0
