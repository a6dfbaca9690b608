"""MileBench-format reading and scoring: synthetic samples written in the benchmark's folder layout."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import mmkv
from mmkv import eval as mmkv_eval
from mmkv.milebench import list_datasets, load_milebench, match_choice, normalise, rouge_l, score_answer
from mmkv.models import adapter_for
from mmkv.tiny.tasks import heldout_set

MODEL = "assets/mmkv-tiny-qwen2vl"


def _context(sample) -> tuple[str, list]:
    """A synthetic chat's user content as MileBench context text with {image#k} marks, and its images."""
    text, images = "", []
    for part in sample.chat[0]["content"]:
        if part["type"] == "image":
            images.append(part["image"])
            text += f"{{image#{len(images)}}}"
        else:
            text += part["text"]
    return text, images


def write_dataset(root: Path, name: str, samples, *, instruction: str = "", choices=None, response=None) -> Path:
    """Write ``samples`` as MileBench dataset ``name`` under ``root`` (images saved as PNG files)."""
    folder = root / name
    (folder / "images").mkdir(parents=True)
    data = []
    for i, s in enumerate(samples):
        context, images = _context(s)
        paths = []
        for j, img in enumerate(images):
            rel = f"s{i}/{j}.png"
            (folder / "images" / f"s{i}").mkdir(exist_ok=True)
            img.save(folder / "images" / rel)
            paths.append(rel)
        inst = {"context": context, "images_path": paths}
        if choices is not None:
            inst["choice_list"] = choices(s)
        data.append({"sample_id": i, "task_instruction_id": 0, "task_instance": inst,
                     "response": response(s) if response else s.answer, "image_quantity_level": "Few"})
    qtype = "multi-choice" if choices is not None else "open-ended"
    doc = {"meta_data": {"task": name, "task_instruction": [instruction], "question_type": qtype}, "data": data}
    (folder / f"{name}.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, list, list]:
    root = tmp_path_factory.mktemp("milebench")
    needles = heldout_set("text_needle", 4, 3, seed=4242)
    which = heldout_set("needle", 4, 3, seed=4243)
    write_dataset(root, "TextNeedleInAHaystack", needles, response=lambda s: s.scene.password)
    write_dataset(root, "WhichImage", which, instruction="Answer with the option's letter.",
                  choices=lambda s: [f"image {k}" for k in range(1, s.scene.k + 1)],
                  response=lambda s: f"image {s.answer.rstrip('.').split()[-1]}")
    return root, needles, which


def test_reader_renders_a_synthetic_sample_token_for_token(bench) -> None:
    root, needles, _ = bench
    assert list_datasets(root) == ["TextNeedleInAHaystack", "WhichImage"]
    assert list_datasets(root / "WhichImage") == ["WhichImage"]
    samples = load_milebench(root, ["TextNeedleInAHaystack"])
    assert [s.sample_id for s in samples] == [0, 1, 2, 3] and all(s.num_images == 3 for s in samples)
    model, processor = mmkv.load(MODEL)
    adapter = adapter_for(model)
    for mb, syn in zip(samples, needles):
        a = adapter.prepare(model, processor, mb.chat)
        b = adapter.prepare(model, processor, syn.chat)
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert (a.inputs["pixel_values"] == b.inputs["pixel_values"]).all()


def test_multi_choice_prompt_layout(bench) -> None:
    root, _, which = bench
    s = load_milebench(root, ["WhichImage"], limit=1)[0]
    text = "".join(p.get("text", "<img>") for p in s.chat[0]["content"])
    assert text.startswith("Answer with the option's letter.\nImage 1:<img>Image 2:<img>Image 3:<img>")
    assert text.endswith(f"{which[0].question}\nChoice list: \nA. image 1\nB. image 2\nC. image 3\nYour answer is: ")
    assert s.choices == ["image 1", "image 2", "image 3"] and s.question_type == "multi-choice"


def test_max_images_keeps_the_last_images_and_the_question(bench) -> None:
    root, needles, _ = bench
    s = load_milebench(root, ["TextNeedleInAHaystack"], limit=1, max_images=2)[0]
    assert s.num_images == 2 and s.dropped_images == 1
    kept = [p["image"] for p in s.chat[0]["content"] if p["type"] == "image"]
    assert kept == [str(root / "TextNeedleInAHaystack" / "images" / f"s0/{j}.png") for j in (1, 2)]
    text = "".join(p.get("text", "") for p in s.chat[0]["content"])
    assert text.startswith("Image 2:") and text.endswith(needles[0].question)


def test_eval_harness_on_milebench_folder_matches_direct_scoring(bench, tmp_path) -> None:
    root, _, _ = bench
    out = tmp_path / "out"
    assert mmkv_eval.main(["--model", MODEL, "--milebench", str(root), "--methods", "full,snapkv", "--budgets", "0.3",
                           "--samples", "3", "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("TextNeedleInAHaystack", "WhichImage") for m in ("full", "snapkv")}
    model, processor = mmkv.load(MODEL)
    scored = {}
    for s in load_milebench(root, limit=3):
        scored.setdefault(s.task, []).append(
            score_answer(s.task, s.question_type, s.answer,
                         mmkv.generate(model, processor, s.chat, "full", 1.0, max_new_tokens=16).text, s.choices))
    for task, scores in scored.items():
        full = next(r for r in rows if r["task"] == task and r["method"] == "full")
        assert full["samples"] == 3 and full["accuracy"] == pytest.approx(sum(scores) / 3)
    # the bundled model knows the password task: the benchmark's needle rule scores it
    needle = next(r for r in rows if r["task"] == "TextNeedleInAHaystack" and r["method"] == "full")
    assert needle["accuracy"] == 1.0


def _lcs_brute(a: list[str], b: list[str]) -> int:
    for n in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(b, n))
        if any(c in subs for c in itertools.combinations(a, n)):
            return n
    return 0


@pytest.mark.parametrize("pred,ref", [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("a b c d e", "e d c b a"),
    ("x y z", "a b c"),
    ("one two one two", "two one two"),
])
def test_rouge_l_against_brute_force_lcs(pred: str, ref: str) -> None:
    lcs = _lcs_brute(pred.split(), ref.split())
    expected = 0.0 if lcs == 0 else 2 * (lcs / len(pred.split())) * (lcs / len(ref.split())) / (
        lcs / len(pred.split()) + lcs / len(ref.split()))
    assert rouge_l(pred, ref) == pytest.approx(expected)


def test_scoring_rules() -> None:
    assert normalise("  The Red circle is in image 3.\n") == "the red circle is in image 3"
    assert normalise("It costs 3.5 (about) dollars") == "it costs 3.5 about dollars"
    # needle datasets: the reference must be a whole word of the answer
    assert score_answer("TextNeedleInAHaystack", "open-ended", "maple", "The password is maple.") == 1.0
    assert score_answer("ImageNeedleInAHaystack", "open-ended", "3", "image 13") == 0.0
    # MMCoQA: substring
    assert score_answer("MMCoQA", "open-ended", "new york", "It is in New York City.") == 1.0
    # multi-choice: letter+text, then text, then a bare letter
    opts = ["red", "blue square", "green"]
    assert match_choice("B. blue square", opts) == "B"
    assert match_choice("I would say green", opts) == "C"
    assert match_choice("a", opts) == "A"
    assert match_choice("no idea", opts) is None
    assert score_answer("ActionSequence", "multi-choice", "green", "C", opts) == 1.0
    assert score_answer("ActionSequence", "multi-choice", "green", "red", opts) == 0.0
    with pytest.raises(ValueError, match="not one of its choices"):
        score_answer("ActionSequence", "multi-choice", "pink", "A", opts)
    # open-ended: ROUGE-L F1 on normalised words
    assert score_answer("ALFRED", "open-ended", "Turn left.", "turn left") == 1.0


def test_clear_errors(bench, tmp_path) -> None:
    root, _, _ = bench
    with pytest.raises(FileNotFoundError, match="no MileBench folder"):
        load_milebench(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="holds no MileBench dataset"):
        load_milebench(tmp_path)
    with pytest.raises(ValueError, match="no dataset Nope"):
        load_milebench(root, ["Nope"])
    broken = tmp_path / "b"
    folder = write_dataset(broken, "Broken", heldout_set("needle", 1, 2, seed=1))
    (folder / "images" / "s0" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match="image .*1.png is missing"):
        load_milebench(broken)
    (folder / "Broken.json").write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match="is not MileBench JSON"):
        load_milebench(broken)
    with pytest.raises(SystemExit) as e:
        mmkv_eval.main(["--milebench", str(tmp_path / "absent")])
    assert e.value.code == 2
