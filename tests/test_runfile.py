"""Run files (``mmkv/trace/runfile.py``): a run saved once opens anywhere without the model.

Round trips (bundled-model runs and a trace shaped like a 7B model's), thumbnail sizes, the errors a
bad file gives, the shipped example runs (``mmkv/assets/runs/``), ``mmkv run --save``, and that
loading a run imports no model class.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmkv
from mmkv import EXAMPLES_DIR
from mmkv.inputs.modality import IMAGE, ModalityMap, VisualItem
from mmkv.models.base import VideoFrames
from mmkv.trace.core import LayerTrace, Packed, Timings, Trace
from mmkv.trace.runfile import (
    BLOB,
    FORMAT_VERSION,
    MANIFEST,
    RUNS_DIR,
    RunFile,
    _Blob,
    _pack,
    _unpack,
    example_runs,
    load_run,
    peek_run,
    save_run,
    thumbnail,
)

REPO = Path(__file__).resolve().parents[1]
NEEDLES = [str(EXAMPLES_DIR / f"needle_{k}.png") for k in (1, 2, 3)]
VIDEO = str(EXAMPLES_DIR / "ball.webm")
QUESTION = "Which image has the orange circle?"


def _plain(trace: Trace) -> dict:
    """The trace as its JSON file holds it (tuples become lists)."""
    return json.loads(json.dumps(trace.to_dict()))


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def result(bundled):
    model, processor = bundled
    chat = mmkv.chat(QUESTION, images=NEEDLES, videos=[VIDEO])
    return mmkv.generate(model, processor, chat, "h2o", 0.4, max_new_tokens=8, decode_evict=True)


# ---- round trips ------------------------------------------------------------------------------------
def test_bundled_run_round_trips(bundled, result, tmp_path):
    _, processor = bundled
    path = save_run(result, tmp_path / "run.mmkvrun", processor, question=QUESTION)
    run = load_run(path)
    assert run.trace.to_dict() == _plain(result.trace)
    assert any(lt.decode_evictions for lt in run.trace.layers)  # per-step data travels too
    assert run.answer == result.text and run.question == QUESTION
    assert run.model == "bundled" and run.label == "h2o @ 0.4"
    assert run.format_version == FORMAT_VERSION and run.mmkv_version == mmkv.__version__ and run.created
    tok = processor.tokenizer
    assert run.tokens == [tok.decode([i]) for i in result.prepared.input_ids.reshape(-1).tolist()]
    assert len(run.tokens) == run.trace.prompt_length
    # the bundled pictures are flat drawings: stored losslessly, every pixel back
    assert len(run.images) == len(result.prepared.images) == 3
    for a, b in zip(run.images, result.prepared.images):
        assert a.size == b.size and np.array_equal(_pixels(a), _pixels(b))
    (video,) = run.videos
    original = result.prepared.videos[0]
    assert len(video.frames) == len(original.frames) == 8
    assert video.timestamps == original.timestamps and video.fps == original.fps and video.duration == original.duration
    for a, b in zip(video.frames, original.frames):
        assert a.size == b.size and np.array_equal(_pixels(a), _pixels(b))
    assert peek_run(path)["summary"] == json.loads(json.dumps(result.trace.summary()))
    assert path.stat().st_size < 30_000


def test_thumbnails_keep_the_aspect_ratio_and_stay_small(result, tmp_path):
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:900, 0:1600]
    photo = np.stack([np.sin(xs / 60) * 90 + 120, np.cos(ys / 45) * 90 + 120, (xs + ys) / 2500 * 255], -1)
    photo = Image.fromarray(np.clip(photo + rng.normal(0, 10, photo.shape), 0, 255).astype(np.uint8))
    assert thumbnail(photo, 448).size == (448, 252)
    assert thumbnail(photo.crop((0, 0, 90, 160)), 448).size == (90, 160)  # never enlarged
    frames = [photo.rotate(k) for k in range(8)]
    video = VideoFrames(frames=frames, timestamps=[float(k) for k in range(8)], fps=1.0)
    images = [photo] * 3
    run = RunFile(trace=result.trace, images=images, videos=[video])
    for codec, tolerance in (("auto", 6.0), ("png", 0.0)):
        path = run.save(tmp_path / f"{codec}.mmkvrun", codec=codec)
        back = load_run(path)
        assert [im.size for im in back.images] == [(448, 252)] * 3
        assert [fr.size for fr in back.videos[0].frames] == [(224, 126)] * 8
        small = thumbnail(photo, 448)
        assert np.abs(_pixels(back.images[0]) - _pixels(small)).mean() <= tolerance
        frame = thumbnail(frames[3], 224)
        assert np.abs(_pixels(back.videos[0].frames[3]) - _pixels(frame)).mean() <= tolerance
        if codec == "auto":
            assert path.stat().st_size < 150_000  # 3 photos at 448 px + 8 frames at 224 px, lossy
    small = run.save(tmp_path / "small.mmkvrun", image_side=128, frame_side=64)
    back = load_run(small)
    assert back.images[0].size == (128, 72) and back.videos[0].frames[0].size == (64, 36)


def _seven_b_trace(n: int = 8192, layers: int = 28, kv_heads: int = 4, q_heads: int = 28, ratio: float = 0.3) -> Trace:
    """A trace shaped like a 7B model's (28 layers, 4 KV heads) on an 8k-token prompt of 8 images."""
    rng = np.random.default_rng(7)
    items, cells, start = [], [], 100
    for k in range(8):
        rows, cols = 25, 40
        items.append(VisualItem(IMAGE, k, 0, "full", rows, cols, start, rows * cols))
        cells.append(
            (
                list(range(start, start + rows * cols)),
                [p // cols for p in range(rows * cols)],
                [p % cols for p in range(rows * cols)],
            )
        )
        start += rows * cols
    capacity = int(ratio * n)
    layer_traces = [
        LayerTrace(
            layer=i,
            kept=Packed([torch.from_numpy(np.sort(rng.choice(n, capacity, replace=False))) for _ in range(kv_heads)]),
            bytes_before=n * kv_heads * 512,
            bytes_after=capacity * kv_heads * 512,
            info={"capacity": capacity},
            modality_mass=Packed(torch.rand(q_heads, 3)),
            entropy=Packed(torch.rand(q_heads)),
            decode_evictions=[[int(x) for x in rng.integers(0, n, kv_heads)] for _ in range(32)],
        )
        for i in range(layers)
    ]
    return Trace(
        method="snapkv",
        params={"window": 32},
        budget=ratio,
        capacity=capacity,
        query_aware=True,
        prompt_length=n,
        span_length=n,
        num_layers=layers,
        num_kv_heads=kv_heads,
        num_q_heads=q_heads,
        head_dim=128,
        bytes_per_token_head=512,
        modality=ModalityMap.from_items(n, items, cells),
        layers=layer_traces,
        timings=Timings(0.5, 0.1, 0.05, [0.02 + 1e-4 * k for k in range(32)]),
        model="Qwen/Qwen2-VL-7B-Instruct",
        family="qwen2_vl",
        answer="The red circle is in image 3.",
        generated_ids=list(range(151000, 151033)),
    )


def test_seven_b_shaped_trace_round_trips_small(tmp_path):
    trace = _seven_b_trace()
    images = [Image.new("RGB", (1280, 960), (40 * k, 90, 200 - 20 * k)) for k in range(8)]
    run = RunFile(trace=trace, images=images, tokens=[f"t{i}" for i in range(trace.prompt_length)], answer=trace.answer)
    path = run.save(tmp_path / "7b.mmkvrun")
    back = load_run(path)
    plain = _plain(trace)
    assert back.trace.to_dict() == plain
    assert back.tokens == run.tokens
    size = path.stat().st_size
    json_gz = len(gzip.compress(json.dumps(plain).encode()))
    # 275k kept positions (28 x 4 heads x 2,457) are near-random here: the bitmaps are the bulk
    assert size < 200_000, size
    assert size < json_gz / 2.5, (size, json_gz)


def test_packed_numbers_round_trip_exactly():
    """Fields the Trace gains later travel as they are: any JSON value comes back equal."""
    value = {
        "ints": list(range(-5, 40)),
        "positions": [100_000 + 7 * k for k in range(40)],
        "dense": list(range(0, 3000, 2)),
        "big": [2**40 + k for k in range(20)],
        "huge": [2**70] * 20,
        "floats": [0.1 * k for k in range(20)],
        "f32": [float(np.float32(k / 3)) for k in range(20)],
        "special": [float("inf"), -0.0, 1e308] * 6,
        "bools": [True, False] * 10,
        "mixed": [1, 2.5] * 10,
        "rows": [[k, k + 1, k + 2] for k in range(10)],
        "shares": [[0.25, 0.5, 0.25]] * 12,
        "ragged": [[1, 2], [3]] * 10,
        "per_step": [[[1, 2], [3, 4]]] * 20,
        "strings": ["a"] * 20,
        "nested": {"x": [None, {"y": list(range(30))}]},
        "empty": [],
        "short": [1, 2],
    }
    blob = _Blob()
    packed = json.loads(json.dumps(_pack(value, blob)))
    back = _unpack(packed, b"".join(blob.parts))
    assert back == value
    assert [type(x) for x in back["floats"]] == [float] * 20 and [type(x) for x in back["ints"]] == [int] * 45
    assert isinstance(packed["dense"], dict) and packed["dense"]["__mmkv_array__"] == "bits"
    assert packed["positions"]["__mmkv_array__"] == "delta" and packed["shares"]["shape"] == [12, 3]


# ---- bad files --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(bundled, result, tmp_path_factory):
    return save_run(result, tmp_path_factory.mktemp("good") / "good.mmkvrun", bundled[1], question=QUESTION)


def _rezip(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def test_bad_files_give_clear_errors(good_file, result, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"not an mmkv run file; run files \(\.mmkvrun\) are written by"):
        load_run(text)
    trace_json = tmp_path / "trace.json"
    result.trace.to_json(trace_json)
    with pytest.raises(ValueError, match="not an mmkv run file .*Trace.from_json"):
        load_run(trace_json)
    gz = tmp_path / "trace.json.gz"
    gz.write_bytes(gzip.compress(trace_json.read_bytes()))
    with pytest.raises(ValueError, match="not an mmkv run file"):
        load_run(gz)
    other_zip = _rezip(good_file, tmp_path / "other.zip", lambda name, data: None if name == MANIFEST else data)
    with pytest.raises(ValueError, match=f"not an mmkv run file \\(a zip without {MANIFEST}\\)"):
        load_run(other_zip)

    def manifest_with(**changes):
        def change(name, data):
            return json.dumps({**json.loads(data), **changes}).encode() if name == MANIFEST else data

        return change

    newer = _rezip(
        good_file, tmp_path / "newer.mmkvrun", manifest_with(format_version=FORMAT_VERSION + 1, mmkv_version="9.0")
    )
    with pytest.raises(
        ValueError, match=rf"made by a newer mmkv \(9\.0, run format {FORMAT_VERSION + 1}\).*upgrade mmkv"
    ):
        load_run(newer)
    with pytest.raises(ValueError, match="made by a newer mmkv"):
        peek_run(newer)
    wrong = _rezip(good_file, tmp_path / "wrong.mmkvrun", manifest_with(format="something-else"))
    with pytest.raises(ValueError, match="not an mmkv run file"):
        load_run(wrong)

    data = good_file.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        truncated = tmp_path / f"cut-{cut}.mmkvrun"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt.*copy it again, or save the run again"):
            load_run(truncated)
    with zipfile.ZipFile(good_file) as zf:
        info = zf.getinfo(BLOB)
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra)
    flipped = bytearray(data)
    flipped[offset + 5] ^= 0xFF  # a damaged byte inside trace.bin's compressed data
    bad = tmp_path / "flipped.mmkvrun"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_run(bad)
    newer_trace = _rezip(
        good_file,
        tmp_path / "field.mmkvrun",
        lambda name, d: (
            json.dumps({**json.loads(d), "a_field_from_the_future": 1}).encode() if name == "trace.json" else d
        ),
    )
    with pytest.raises(ValueError, match="cannot be read by this mmkv .*Upgrade mmkv"):
        load_run(newer_trace)
    no_images = _rezip(good_file, tmp_path / "noimg.mmkvrun", manifest_with(images=[]))
    with pytest.raises(ValueError, match="truncated or corrupt .*image 1"):
        load_run(no_images)
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "missing.mmkvrun")
    assert load_run(io.BytesIO(data)).answer == result.text  # a file object (an upload) works too


def test_saving_checks_its_inputs(bundled, result, tmp_path):
    run = RunFile.from_result(result, bundled[1])
    with pytest.raises(ValueError, match="the trace has image 3 but the run holds 2 images"):
        RunFile(trace=result.trace, images=run.images[:2], videos=run.videos).save(tmp_path / "x.mmkvrun")
    with pytest.raises(ValueError, match="prompt tokens"):
        RunFile(trace=result.trace, images=run.images, videos=run.videos, tokens=["a"]).save(tmp_path / "x.mmkvrun")
    with pytest.raises(ValueError, match="codec"):
        run.save(tmp_path / "x.mmkvrun", codec="gif")
    with pytest.raises(ValueError, match="processor"):
        save_run(result, tmp_path / "x.mmkvrun")
    assert not (tmp_path / "x.mmkvrun").exists() and not list(tmp_path.iterdir())  # no partial file left


# ---- the shipped runs -------------------------------------------------------------------------------
def test_shipped_runs_load_and_draw():
    from viz import overlay_panels

    index = json.loads((RUNS_DIR / "index.json").read_text())
    runs = example_runs()
    assert runs and len(runs) == len(index)
    assert sorted(e["file"] for e in index) == sorted(p.name for p in RUNS_DIR.glob("*.mmkvrun"))
    assert sum(p.stat().st_size for p in RUNS_DIR.iterdir()) < 2_000_000
    for entry in runs:
        assert entry["description"] and entry["question"]
        run = load_run(entry["file"])
        t = run.trace
        assert t.method == entry["method"] and run.answer == entry["answer"] == t.answer
        assert t.model == "bundled" and run.model == "bundled"  # no path of the machine that made it
        assert len(run.tokens) == t.prompt_length == len(t.modality)
        assert run.agreement is not None and 0.0 <= run.agreement["overlap"] <= 1.0
        for item in t.modality.items:
            pictures = run.images if item.modality == IMAGE else run.videos
            assert item.source < len(pictures)
        panels = overlay_panels(t, run.images, run.videos)
        frames = sum(len(v.frames) for v in run.videos)
        assert len(panels) == len(run.images) + frames > 0
        if t.method == "h2o" and t.params.get("decode_evict"):
            assert any(lt.decode_evictions for lt in t.layers)
        if t.method == "hybridkv":
            assert any(lt.decode_retrievals for lt in t.layers)


def test_a_loaded_run_opens_in_inspect(good_file):
    pytest.importorskip("plotly")
    from mmkv.ui.handlers import AppState, Run, inspect

    run = load_run(good_file)
    state = AppState()
    state.add_run(Run(**run.app_fields()))
    view = inspect(state, run.label, "layer 1", "KV head 0")
    assert len(view.gallery) == 3 + 8 and view.strip
    state.cleanup()


# ---- CLI and imports --------------------------------------------------------------------------------
def test_cli_save_writes_a_run_that_loads(tmp_path, capsys):
    from mmkv.cli import main

    target = tmp_path / "cli.mmkvrun"
    args = [
        "run",
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        "6",
        "--method",
        "snapkv",
        "--budget",
        "0.3",
        "--save",
        str(target),
    ]
    for f in NEEDLES:
        args += ["--image", f]
    assert main(args) == 0
    assert f"run saved to {target}" in capsys.readouterr().out
    run = load_run(target)
    assert run.question == QUESTION and run.trace.method == "snapkv" and len(run.images) == 3
    assert len(run.tokens) == run.trace.prompt_length


def test_cli_save_is_checked_before_the_run(tmp_path, capsys):
    from mmkv.cli import main

    assert main(["run", "--prompt", "x", "--model", "no/such-model", "--save", str(tmp_path)]) == 2
    assert "--save" in capsys.readouterr().err
    assert (
        main(["run", "--prompt", "x", "--model", "no/such-model", "--save", str(tmp_path / "nope" / "r.mmkvrun")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_loading_a_run_imports_no_model_class():
    path = next(iter(example_runs()))["file"]
    code = (
        "import sys\n"
        "import mmkv\n"
        f"run = mmkv.load_run({path!r})\n"
        "import viz\n"
        "assert viz.overlay_panels(run.trace, run.images, run.videos)\n"
        # model classes live in transformers.models.<family>.modeling_*; some transformers releases (5.17)
        # import every family's image-processing module at start-up, which loads no model
        "models = [m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m]\n"
        "assert not models, models\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
