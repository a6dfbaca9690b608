"""The teaching model's synthetic tasks, tokenizer, fast encoder and (when shipped) the trained model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mmkv.tiny.tasks import (
    COLOUR_NAMES,
    TASKS,
    VIDEO_TASKS,
    check_answer,
    expected_answer,
    heldout_set,
    make_episode,
    make_sample,
    render_image,
)

ASSET = Path(__file__).resolve().parents[1] / "mmkv" / "assets" / "mmkv-tiny-qwen2vl"


@pytest.fixture(scope="module")
def processor():
    from training.tiny.model import build_processor

    return build_processor()


@pytest.fixture(scope="module")
def tiny_model(processor):
    from training.tiny.model import build_model

    return build_model(processor.tokenizer).eval()


def _pixels(chat):
    out = []
    for m in chat:
        for p in m["content"]:
            if p["type"] == "image":
                out.append(p["image"].tobytes())
            elif p["type"] == "video":
                out.append(b"".join(f.tobytes() for f in p["video"]))
    return out


@pytest.mark.parametrize("task", TASKS)
def test_generator_is_deterministic_per_seed(task):
    a, b = make_sample(task, 3, 5), make_sample(task, 3, 5)
    assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
    assert _pixels(a.chat) == _pixels(b.chat)
    others = [make_sample(task, s, 5) for s in range(4, 12)]
    assert any((o.question, o.answer) != (a.question, a.answer) or o.scene != a.scene for o in others)
    ep1 = make_episode(random.Random("x"), k=4)
    ep2 = make_episode(random.Random("x"), k=4)
    assert ep1.turns == ep2.turns and ep1.scene == ep2.scene


def _wrong_answers(answer: str) -> list[str]:
    """Answers that differ from ``answer`` in one decisive word or number."""
    from mmkv.tiny.tasks import COLOUR_NAMES, DIRECTIONS, PASSWORDS, SHAPES

    out = []
    words = answer.rstrip(".").split(" ")
    for i, w in enumerate(words):
        for pool in (COLOUR_NAMES, SHAPES, DIRECTIONS, PASSWORDS, [str(n) for n in range(1, 9)], ["first", "last"]):
            if w in pool:
                repl = next(x for x in pool if x != w)
                out.append(" ".join(words[:i] + [repl] + words[i + 1 :]) + ".")
    return out


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_checkable_from_the_scene(task):
    for i in range(60):
        k = None if task in VIDEO_TASKS else 1 + i % 8
        s = make_sample(task, i, k)
        assert s.task == task
        assert s.check(s.answer), (s.question, s.answer)
        assert s.check("  " + s.answer + "\n")
        assert len(s.answer.split()) >= 4  # multi-token answers: the decisive token is not the first
        wrong = _wrong_answers(s.answer)
        assert wrong, s.answer
        for w in wrong:
            assert not s.check(w), (s.question, w)
        assert not s.check("")
        assert not check_answer(s.scene, task, "What is this?", s.answer)


def test_checker_uses_the_scene_not_the_generator():
    s = make_sample("needle", 1, 4)
    k = int(s.answer.rstrip(".").split()[-1]) - 1
    target = next(o for o in s.scene.images[k] if f"the {o.colour} {o.shape}" in s.question)
    # put a copy of the target into another image: the question no longer has a unique answer
    other = (k + 1) % s.scene.k
    s.scene.images[other] = s.scene.images[other] + (target,)
    assert expected_answer(s.scene, "needle", s.question) is None
    v = make_sample("video_direction", 2)
    v.scene.positions.reverse()
    assert not v.check(v.answer)


def test_samples_cover_up_to_eight_images_and_eight_frame_video():
    s = make_sample("needle", 0, 8)
    assert sum(p["type"] == "image" for p in s.chat[0]["content"]) == 8
    assert all(p["image"].size == (112, 112) for p in s.chat[0]["content"] if p["type"] == "image")
    v = make_sample("video_colour", 0)
    (part,) = [p for p in v.chat[0]["content"] if p["type"] == "video"]
    assert len(part["video"]) == 8 and part["fps"] > 0
    t = make_sample("text_needle", 0, 6)
    texts = [p["text"] for p in t.chat[0]["content"] if p["type"] == "text"]
    assert any(x.startswith("The password is") for x in texts[:-1])


def test_tokenizer_round_trips_and_knows_every_word(processor):
    tok = processor.tokenizer
    for task in TASKS:
        for s in heldout_set(task, 20, 8):
            for text in (s.question, s.answer):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids, text
                assert tok.decode(ids) == text
    for name in (
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<|endoftext|>",
    ):
        assert tok.convert_tokens_to_ids(name) != tok.unk_token_id
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    "task,k", [("needle", 8), ("colour_at", 3), ("text_needle", 5), ("video_direction", None), ("video_colour", None)]
)
def test_fast_encoder_equals_the_processor_path(processor, tiny_model, task, k):
    from mmkv.models import adapter_for
    from training.tiny.train import FastEncoder

    enc = FastEncoder(processor)
    s = make_sample(task, 11, k)
    fast = enc.encode([s.episode()], answer_last=False)
    ref = adapter_for(tiny_model).prepare(tiny_model, processor, s.chat).inputs
    for key in (
        "input_ids",
        "mm_token_type_ids",
        "attention_mask",
        "image_grid_thw",
        "pixel_values",
        "video_grid_thw",
        "pixel_values_videos",
    ):
        assert (key in ref) == (key in fast), key
        if key in ref:
            assert torch.equal(ref[key].cpu(), fast[key]), key
    # the training row (with the answer) extends the prompt by the answer tokens and <|im_end|>, which are its labels
    full = enc.encode([s.episode()])
    n = ref["input_ids"].shape[1]
    assert torch.equal(full["input_ids"][0, :n], ref["input_ids"][0])
    learned = full["labels"][0][full["labels"][0] != -100].tolist()
    assert learned == processor.tokenizer(s.answer, add_special_tokens=False)["input_ids"] + [
        processor.tokenizer.eos_token_id
    ]


def test_fast_encoder_multi_turn_equals_the_processor_path(processor, tiny_model):
    from mmkv.models import adapter_for
    from training.tiny.train import FastEncoder

    enc = FastEncoder(processor)
    rng = random.Random(3)
    eps = [make_episode(rng, k=3, max_turns=5), make_episode(rng, video=True, max_turns=3)]
    eps = [e for e in eps if len(e.turns) > 1] or [make_episode(random.Random(9), k=2, max_turns=4)]
    for ep in eps:
        fast = enc.encode([ep], answer_last=False)
        ref = adapter_for(tiny_model).prepare(tiny_model, processor, ep.chat()).inputs
        assert torch.equal(ref["input_ids"].cpu(), fast["input_ids"])


def test_probe_labels_bind_every_visual_token_and_mark_the_moving_ball(processor):
    """Binding labels: one per visual token, in sequence order (image index / temporal group); motion labels:
    the direction, recomputed here from the rendered ball's pixel centroids, on exactly the ball's cells."""
    import numpy as np

    from mmkv.tiny.tasks import CELL, DIRECTIONS, GRID, SHAPES, render_frames
    from training.tiny.train import FastEncoder

    enc = FastEncoder(processor)
    rng = random.Random(5)
    eps = [make_episode(rng, k=3), make_episode(rng, video=True), make_episode(rng, k=1)]
    batch = enc.encode(eps)
    visual = int((batch["mm_token_type_ids"] > 0).sum())
    assert (
        batch["aux_bind"].tolist()
        == [0] * 16 + [1] * 16 + [2] * 16 + [g for g in range(4) for _ in range(16)] + [0] * 16
    )
    assert len(batch["aux_bind"]) == visual
    video = eps[1].scene
    _, labels = render_frames(video)

    def ball_centre(lab):  # label keys 1 + colour * 3 + shape; the ball is the only circle
        ys, xs = np.nonzero((lab > 0) & ((lab.astype(int) - 1) % len(SHAPES) == SHAPES.index("circle")))
        return xs.mean(), ys.mean()

    (x0, y0), (x1, y1) = ball_centre(labels[0]), ball_centre(labels[-1])
    truth = ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
    motion = batch["video_aux_motion"].reshape(4, GRID * GRID)
    assert set(motion.unique().tolist()) == {0, 1 + DIRECTIONS.index(truth)}
    for g in range(4):  # the cell holding the ball's centre in either frame of the temporal pair is marked
        marked = motion[g] > 0
        assert any(
            marked[int(cy // CELL) * GRID + int(cx // CELL)] for cx, cy in map(ball_centre, labels[2 * g : 2 * g + 2])
        ), g
        assert int(marked.sum()) <= 6


def test_retrieval_targets_point_from_the_decisive_answer_token_to_its_visual_source(processor):
    """For every answer with a single visual source, the query token's next label is the decisive word and
    the target is exactly the named image's run of image tokens (or the named temporal group of the video)."""
    from training.tiny.train import FastEncoder

    enc = FastEncoder(processor)
    tok = processor.tokenizer
    pad = {"image": tok.convert_tokens_to_ids("<|image_pad|>"), "video": tok.convert_tokens_to_ids("<|video_pad|>")}
    rng = random.Random(8)
    eps = [
        make_episode(rng, k=5, max_turns=6, weights={"needle": 1, "colour_at": 1, "text_needle": 1}) for _ in range(6)
    ]
    eps += [make_episode(rng, video=True, max_turns=4) for _ in range(4)]
    batch = enc.encode(eps)
    ids, labels = batch["input_ids"], batch["labels"]
    expected = 0
    for ep in eps:
        expected += sum(t in ("needle", "colour_at", "video_colour") for t, _, _ in ep.turns)
    assert len(batch["retrieval_row"]) == expected > 0
    entries = list(zip(batch["retrieval_row"].tolist(), batch["retrieval_query"].tolist(), batch["retrieval_mask"]))
    for row, ep in enumerate(eps):
        turns = [t for t in ep.turns if t[0] in ("needle", "colour_at", "video_colour")]
        mine = [e for e in entries if e[0] == row]
        assert len(mine) == len(turns)
        for (_, q, mask), (task, question, answer) in zip(mine, turns):
            word = tok.convert_ids_to_tokens(int(labels[row, q + 1])).strip()
            decisive = answer.rstrip(".").split()[3 if task == "video_colour" else -1]
            assert word == decisive
            pos = mask.nonzero().flatten()
            assert len(pos) == 16
            if ep.is_video:
                runs = (ids[row] == pad["video"]).nonzero().flatten()
                g = 0 if "first" in question else 3
                assert torch.equal(pos, runs[g * 16 : (g + 1) * 16])
                continue
            runs = (ids[row] == pad["image"]).nonzero().flatten()
            image_starts = [int(r) for i, r in enumerate(runs) if i == 0 or runs[i - 1] != r - 1]
            k = image_starts.index(int(pos[0]))
            assert torch.equal(pos, torch.arange(image_starts[k], image_starts[k] + 16))
            if task == "needle":  # the named pair is in image k (from the scene, not the answer)
                colour, shape = question.rstrip("?").split()[-2:]
                assert any(o.colour == colour and o.shape == shape for o in ep.scene.images[k])
            else:  # colour_at asks about image k
                assert f"image {k + 1}" in question


def test_training_runs_and_chains_stages(tmp_path):
    from training.tiny.train import main

    common = [
        "--batch",
        "4",
        "--eval-n",
        "2",
        "--eval-every",
        "100",
        "--log-every",
        "1",
        "--threads",
        "1",
        "--k-start",
        "2",
    ]
    assert main(["--work", str(tmp_path / "a"), "--out", str(tmp_path / "a-out"), "--steps", "2", *common]) == 0
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] > 0 and r["aux"] > 0 for r in steps)
    state = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    assert state["step"] == 2 and {k.split(".")[0] for k in state["aux"]} == {"cells", "motion", "bind"}
    # a later stage warm-starts from the weights with its own schedule; resuming continues the step count
    assert (
        main(
            [
                "--work",
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "b-out"),
                "--init",
                str(tmp_path / "a"),
                "--steps",
                "1",
                "--retrieval-weight",
                "1",
                *common,
            ]
        )
        == 0
    )
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert b["step"] == 1
    rec = next(json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines() if '"loss"' in line)
    assert 0.0 < rec["retrieval_mass"] < 1.0  # the eager-attention retrieval loss ran
    assert json.loads((tmp_path / "b" / "latest" / "config.json").read_text()).get("_attn_implementation") in (
        None,
        "sdpa",
    )
    assert main(["--work", str(tmp_path / "a"), "--out", str(tmp_path / "a-out"), "--steps", "3", *common]) == 0
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["step"] == 3
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["--work", str(tmp_path / "c"), "--init", str(tmp_path / "absent"), "--steps", "1", *common])


def test_saved_model_loads_offline_with_mmkv(tmp_path, processor, tiny_model, monkeypatch):
    import mmkv
    from training.tiny.model import save

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save(tiny_model, processor, tmp_path / "m")
    model, proc = mmkv.models.load(tmp_path / "m", device="cpu")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    s = make_sample("video_colour", 0)
    out = mmkv.generate(model, proc, s.chat, method="full", max_new_tokens=3)
    assert len(out.token_ids) >= 1


# --------------------------------------------------------------------------------------------------
# The shipped model (skipped until mmkv/assets/mmkv-tiny-qwen2vl exists)
# --------------------------------------------------------------------------------------------------


def _shipped_tasks() -> list[str]:
    meta = json.loads((ASSET / "training_metrics.json").read_text())
    return list(meta["shipped_tasks"])


def test_model_says_which_suite_it_was_trained_on():
    """training_metrics.json's "suite" is read by suite_of (the eval harness, measure_tiny, the examples and these
    tests draw the bundled model's samples with it); a model without one gets v1's, today's defaults, and v1's
    suite gives exactly the generator's default samples."""
    from mmkv.tiny.tasks import V1_SUITE, V2_SUITE, Suite, shipped_tasks, suite_of

    meta = json.loads((ASSET / "training_metrics.json").read_text())
    suite = suite_of()
    assert suite == suite_of("bundled") == suite_of(ASSET) == Suite.from_json(meta["suite"])
    assert set(shipped_tasks()) == set(meta["shipped_tasks"]) <= set(suite.tasks)
    assert suite_of("Qwen/Qwen2.5-VL-7B-Instruct") == V1_SUITE and shipped_tasks("no/such-model") == ()
    assert Suite.from_json(V2_SUITE.to_json()) == V2_SUITE and Suite.from_json(V1_SUITE.to_json()) == V1_SUITE
    for task in V1_SUITE.tasks:
        k = V1_SUITE.hardest(task)
        a, b = V1_SUITE.heldout(task, 3, k, seed=777), heldout_set(task, 3, k, seed=777)
        assert [(x.question, x.answer, x.scene) for x in a] == [(x.question, x.answer, x.scene) for x in b]
        assert [_pixels(x.chat) for x in a] == [_pixels(x.chat) for x in b]
    v2 = V2_SUITE.heldout("needle", 1, 8, seed=777)[0]
    assert (v2.scene.size, v2.scene.shaded) == (168, True)
    assert V2_SUITE.heldout("spot_difference", 1, None)[0].scene.size == 196
    assert V2_SUITE.heldout("video_colour", 1, 8)[0].chat[0]["content"][0]["video"][0].size == (112, 112)


@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="the teaching model is not in mmkv/assets/")
def test_shipped_model_answers_heldout_set(monkeypatch):
    import mmkv
    from mmkv.tiny.tasks import suite_of

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = mmkv.models.load(ASSET, device="cpu")
    assert (ASSET / "model.safetensors").stat().st_size <= 25 * 2**20
    text = model.config.text_config  # grouped-query attention with layers and heads worth drawing
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert text.num_hidden_layers >= 6 and text.num_attention_heads >= 8 and text.num_key_value_heads >= 4
    assert text.num_attention_heads > text.num_key_value_heads
    suite = suite_of(ASSET)  # the tasks and image sizes the model was trained on
    tasks = _shipped_tasks()
    assert tasks and set(tasks) <= set(suite.tasks)
    n = 40
    for task in tasks:  # each at its hardest setting (8 images, two pictures, 8 frames), at the model's own sizes
        samples = suite.heldout(task, n, suite.hardest(task), seed=777)  # fixed, not the training-time eval seed
        right = 0
        for s in samples:
            out = mmkv.generate(model, processor, s.chat, method="full", max_new_tokens=16, record_attention=False)
            right += s.check(out.text)
        assert right / n >= 0.95, f"{task}: {right}/{n}"


@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="the teaching model is not in mmkv/assets/")
def test_shipped_image_prompts_are_mostly_visual_as_in_the_papers():
    """Every shipped task's prompt at its hardest setting, built as users build it (the model's processor and
    chat template through the adapter), is at least 75% visual tokens (the papers' regime: 576 per LLaVA image)."""
    import mmkv
    from mmkv.models import adapter_for
    from mmkv.tiny.tasks import suite_of

    model, processor = mmkv.models.load(ASSET, device="cpu")
    suite = suite_of(ASSET)
    for task in _shipped_tasks():
        for s in suite.heldout(task, 5, suite.hardest(task), seed=777):
            counts = adapter_for(model).prepare(model, processor, s.chat).modality.counts()
            visual = counts.get("image", 0) + counts.get("video", 0)
            assert visual / sum(counts.values()) >= 0.75, (task, counts)


def test_example_answers_are_what_the_scenes_imply():
    """``examples.json``'s stored answers are recomputed from the scenes the example files were drawn
    from (the oracle), every example is a shipped task, and the images on disk are those scenes."""
    import sys

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ASSET.parents[2] / "scripts"))
    import make_examples
    from mmkv.tiny.tasks import ALL_TASKS

    folder = ASSET.parent / "examples"
    items = json.loads((folder / "examples.json").read_text())
    assert items == make_examples.examples()
    needle, video = make_examples.task_scenes()
    spot = make_examples.spot_scene()
    shipped = set(_shipped_tasks())
    for item in items:
        question = item["text"].splitlines()[-1]
        scene = video if "ball.webm" in item["files"] else spot if "spot_1.png" in item["files"] else needle
        task = next(t for t in ALL_TASKS if expected_answer(scene, t, question))
        assert task in shipped, (item["text"], task)
        assert expected_answer(scene, task, question) == item["answer"], item
        assert all((folder / f).is_file() for f in item["files"])
    pictures = [(f"needle_{k + 1}.png", objs, needle) for k, objs in enumerate(needle.images)]
    if any("spot_1.png" in item["files"] for item in items):
        pictures += [(f"spot_{k + 1}.png", objs, spot) for k, objs in enumerate(spot.images)]
    for name, objs, sc in pictures:  # PNGs are lossless: the files are the scene, pixel for pixel
        png = np.asarray(Image.open(folder / name).convert("RGB"))
        assert np.array_equal(png, np.asarray(render_image(objs, sc.size, sc.shaded)[0].convert("RGB")))
    assert {i["method"] for i in items} >= {"lookm", "madakv", "hybridkv", "h2o"}


STAGE = ASSET.parents[2] / "training" / "tiny-v2" / "n2"


@pytest.mark.skipif(not (STAGE / "metrics.json").is_file(), reason="no finished v2 stage in training/tiny-v2/")
def test_ship_tiny_writes_the_v2_model_dir_and_follows_it(tmp_path, monkeypatch):
    """scripts/ship_tiny.py (held-out check stubbed): the model files without the trainer's records, the v2 suite,
    the shipped tasks at the bar, the stage chain back to g0, a card that says which tasks ship; a stage whose
    needle fails is refused (nothing written), --force never writes the bundled folder; make_examples follows
    the written model (168 px shaded needle images, count and spot_difference examples only when shipped)."""
    import sys

    sys.path.insert(0, str(ASSET.parents[2] / "scripts"))
    import make_examples
    import ship_tiny
    from mmkv.tiny.tasks import V2_SUITE, shipped_tasks, suite_of

    acc = {name: 1.0 for name, _task, _k in ship_tiny.SETTINGS}
    acc["count@8"] = 0.9
    monkeypatch.setattr(ship_tiny, "evaluate", lambda *a: (dict(acc), {}))
    out = tmp_path / "m"
    assert ship_tiny.main([str(STAGE), "--out", str(out), "--samples", "3"]) == 0
    assert suite_of(out) == V2_SUITE
    assert shipped_tasks(out) == ("needle", "text_needle", "spot_difference", "video_direction", "video_colour")
    assert (out / "model.safetensors").read_bytes() == (STAGE / "model.safetensors").read_bytes()
    assert not {"aux.safetensors", "log.jsonl", "args.json", "metrics.json"} & {f.name for f in out.iterdir()}
    meta = json.loads((out / "training_metrics.json").read_text())
    chain = [c["stage"] for c in meta["chain"]]
    assert chain[0] == "g0" and chain[-1] == "n2" and meta["total_steps"] == sum(c["steps"] for c in meta["chain"])
    card = (out / "README.md").read_text()
    assert "| `count` |" in card and "no (below the bar" in card
    assert "6 layers, 8 attention heads over 4 KV heads" in card and "scripts/train_tiny_v2.sh" in card

    items = make_examples.tasked_examples(model=out)
    assert {t for t, _ in items} == {"needle", "text_needle", "spot_difference", "video_direction", "video_colour"}
    needle, _video = make_examples.task_scenes(model=out)
    assert (needle.size, needle.shaded) == (168, True) and make_examples.spot_scene(out).size == 196
    assert all(item["answer"] for _t, item in items)

    acc["needle@8"] = 0.9
    assert ship_tiny.main([str(STAGE), "--out", str(tmp_path / "no"), "--samples", "3"]) == 2
    assert not (tmp_path / "no").exists()
    assert ship_tiny.main([str(STAGE), "--force", "--samples", "3"]) == 2  # never a forced bundled model


# --------------------------------------------------------------------------------------------------
# Teaching model v2 (docs/tiny-v2.md): the new tasks, the v2 vocabulary and prompt shape, the growth oracle
# --------------------------------------------------------------------------------------------------


def _label_sets(scene):
    """Per image, from the rendered label maps (not the scene's objects): {shape: (colour, centroid)}."""
    import numpy as np

    from mmkv.tiny.tasks import SHAPES

    out = []
    for objs in scene.images:
        _, lab = render_image(objs, scene.size)
        found = {}
        for key in np.unique(lab[lab > 0]):
            colour, shape = COLOUR_NAMES[(int(key) - 1) // len(SHAPES)], SHAPES[(int(key) - 1) % len(SHAPES)]
            ys, xs = np.nonzero(lab == key)
            found[shape] = (colour, (xs.mean(), ys.mean()))
        out.append(found)
    return out


def _difference_from_pixels(scene) -> str:
    a, b = _label_sets(scene)
    changes = []
    for shape in sorted(set(a) | set(b)):
        if shape not in b:
            changes.append(f"The {a[shape][0]} {shape} disappeared.")
        elif shape not in a:
            article = "An" if b[shape][0][0] in "aeiou" else "A"
            changes.append(f"{article} {b[shape][0]} {shape} appeared.")
        elif a[shape][0] != b[shape][0]:
            changes.append(f"The {a[shape][0]} {shape} turned {b[shape][0]}.")
        elif sum((p - q) ** 2 for p, q in zip(a[shape][1], b[shape][1])) ** 0.5 > 5:
            changes.append(f"The {a[shape][0]} {shape} moved.")
    assert len(changes) == 1, changes
    return changes[0]


def _v2_wrong_answers(answer: str) -> list[str]:
    from mmkv.tiny.tasks import CHANGES, NUMBER_WORDS

    out = _wrong_answers(answer)
    words = answer.rstrip(".").split(" ")
    for i, w in enumerate(words):
        for pool in (NUMBER_WORDS, CHANGES):
            if w in pool:
                for repl in pool:
                    if repl != w:
                        out.append(" ".join(words[:i] + [repl] + words[i + 1 :]) + ".")
    return out


@pytest.mark.parametrize("task", ["spot_difference", "count"])
def test_v2_task_answers_are_recomputed_from_the_pixels(task):
    """Both new tasks: the reference answer equals one recomputed from the rendered label maps (count: the images
    whose pixels hold the colour; spot_difference: the one shape whose presence, colour or centroid differs),
    wrong variants are rejected, answers are sentences whose decisive word is not the first token."""
    from mmkv.tiny.tasks import NUMBER_WORDS, V2_SIZES

    seen = set()
    for i in range(80):
        k = None if task == "spot_difference" else 1 + i % 8
        s = make_sample(task, i, k)
        assert s.scene.size == V2_SIZES[task]
        assert s.check(s.answer) and s.check(" " + s.answer + "\n")
        assert len(s.answer.split()) >= 4
        if task == "count":
            colour = s.question.split()[-2]
            n = sum(colour in {c for c, _ in found.values()} for found in _label_sets(s.scene))
            word = s.answer.split()[2]
            assert word == NUMBER_WORDS[n], (s.question, s.answer, n)
            assert s.answer.split()[1] == ("is" if n == 1 else "are")
            seen.add(n)
        else:
            assert s.scene.k == 2
            assert s.answer == _difference_from_pixels(s.scene), s.answer
            seen.add(s.answer.rstrip(".").split()[-1] if s.answer.split()[-1] not in COLOUR_NAMES else "turned")
        wrong = [w for w in _v2_wrong_answers(s.answer) if w != s.answer]
        assert wrong
        for w in wrong:
            assert not s.check(w), (s.question, w)
        assert not check_answer(s.scene, task, "What is this?", s.answer)
    if task == "count":
        assert seen >= set(range(8))  # counts are drawn uniformly over 0..k
    else:
        assert {"moved", "appeared", "disappeared"} <= seen and len(seen) >= 4


def test_v2_checker_refuses_ambiguous_scenes():
    from dataclasses import replace

    from mmkv.tiny.tasks import expected_answer, make_difference_scene

    s = make_sample("spot_difference", 5)
    first, second = s.scene.images
    # a second change (every shape of the second picture turns another colour): no single answer
    recoloured = tuple(replace(o, colour=next(c for c in COLOUR_NAMES if c != o.colour)) for o in second)
    s.scene.images[1] = recoloured + ()
    if len(first) > 1 or len(second) > 1:
        assert expected_answer(s.scene, "spot_difference", s.question) in (
            None,
            *[f"The {o.colour} {o.shape} turned {r.colour}." for o, r in zip(second, recoloured)],
        )
    # identical pictures: nothing changed
    s.scene.images[1] = first
    assert expected_answer(s.scene, "spot_difference", s.question) is None
    for change in ("turned", "moved", "appeared", "disappeared"):
        scene = make_difference_scene(random.Random(change), change=change)
        assert change in expected_answer(scene, "spot_difference", "What changed between the two pictures?")
    c = make_sample("count", 3, 6)
    assert expected_answer(c.scene, "count", "How many images have a pink shape?") is None
    assert expected_answer(c.scene, "count", "How many images have a orange shape?") is None  # "an orange"


def test_v2_episodes_and_vocabulary():
    from mmkv.tiny.tasks import V2_TASKS, WORDS, WORDS_V2
    from mmkv.tiny.tokenizer import build_tokenizer, vocabulary

    assert vocabulary(2)[: len(vocabulary())] == vocabulary()  # every v1 id is kept
    assert not set(WORDS_V2) & set(WORDS)
    tok = build_tokenizer(2)
    for task in V2_TASKS:
        for s in heldout_set(task, 20, 8):
            for text in (s.question, s.answer):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids and tok.decode(ids) == text
    rng = random.Random(4)
    for kind in ("spot", "count", "images", "video"):
        for _ in range(5):
            ep = make_episode(rng, k=6, kind=kind, size=168)
            assert ep.turns
            for task, q, a in ep.turns:
                assert check_answer(ep.scene, task, q, a)
    ep = make_episode(
        random.Random(1), k=8, kind="count", weights={"count": 1, "needle": 0, "text_needle": 0}, max_turns=1
    )
    assert (
        ep.turns[0][1]
        == f"How many images have {'an' if ep.scene.focus[0] in 'aeiou' else 'a'} {ep.scene.focus} shape?"
    )


@pytest.fixture(scope="module")
def v2_processor():
    from training.tiny.grow import build_v2_processor

    return build_v2_processor()


def test_v2_prompts_are_mostly_visual_tokens(v2_processor):
    """Image prompts at their hardest held-out settings: visual (pad) tokens are at least 75% of the prompt."""
    from mmkv.tiny.tasks import V2_SIZES, V2_TASKS
    from training.tiny.train import FastEncoder

    enc = FastEncoder(v2_processor)
    for task in V2_TASKS:
        k = 8 if task in ("needle", "text_needle", "count") else None
        eps = [s.episode() for s in heldout_set(task, 16, k, size=V2_SIZES.get(task))]
        batch = enc.encode(eps, answer_last=False, aux=False)
        share = float((batch["mm_token_type_ids"] > 0).sum() / batch["attention_mask"].sum())
        assert share >= 0.75, (task, share)


@pytest.mark.parametrize(
    "task,k", [("spot_difference", None), ("count", 8), ("needle", 5), ("text_needle", 3), ("video_colour", None)]
)
def test_v2_fast_encoder_equals_the_processor_path(v2_processor, task, k):
    from mmkv.models import adapter_for
    from mmkv.tiny.tasks import V2_SIZES
    from training.tiny.grow import build_v2_model
    from training.tiny.train import FastEncoder

    model = build_v2_model(v2_processor.tokenizer).eval()
    enc = FastEncoder(v2_processor)
    s = make_sample(task, 21, k, size=V2_SIZES.get(task))
    fast = enc.encode([s.episode()], answer_last=False)
    ref = adapter_for(model).prepare(model, v2_processor, s.chat).inputs
    for key in (
        "input_ids",
        "mm_token_type_ids",
        "image_grid_thw",
        "pixel_values",
        "video_grid_thw",
        "pixel_values_videos",
    ):
        assert (key in ref) == (key in fast), key
        if key in ref:
            assert torch.equal(ref[key].cpu(), fast[key]), key
    # mixed sizes in one batch (196 px pictures next to 168 px ones) keep every image's patches and grid
    other = make_sample("needle", 2, 3, size=168)
    both = enc.encode([s.episode(), other.episode()], answer_last=False, aux=False)
    one = enc.encode([other.episode()], answer_last=False, aux=False)
    if "pixel_values" in fast:
        n = fast["pixel_values"].shape[0]
        assert torch.equal(both["pixel_values"][:n], fast["pixel_values"]) and torch.equal(
            both["pixel_values"][n:], one["pixel_values"]
        )


@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="the teaching model is not in mmkv/assets/")
def test_grown_v2_computes_v1s_function(tmp_path, monkeypatch):
    """The oracle of training.tiny.grow: v2 (6 layers, 8 query heads over 4 KV heads, hidden 256) grown from the
    shipped v1 gives v1's logits over v1's vocabulary (fp32 tolerance) on held-out prompts and the same greedy
    answers through mmkv.generate with the Full cache, after a save / load round trip."""
    import mmkv
    from mmkv.tiny.tokenizer import build_tokenizer
    from training.tiny.grow import build_v2_processor, grow, load_v1
    from training.tiny.model import save

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    v1 = load_v1()
    tok = build_tokenizer(2)
    save(grow(v1, tok), build_v2_processor(tok), tmp_path / "v2")
    v2, proc2 = mmkv.models.load(tmp_path / "v2", device="cpu")
    _, proc1 = mmkv.models.load(ASSET, device="cpu")
    t = v2.config.text_config
    assert type(v2).__name__ == "Qwen2VLForConditionalGeneration"
    assert (
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.hidden_size // t.num_attention_heads,
    ) == (6, 8, 4, 32)
    assert t.rope_parameters["mrope_section"] == v1.config.text_config.rope_parameters["mrope_section"]
    assert (tmp_path / "v2" / "model.safetensors").stat().st_size <= 25 * 2**20
    from mmkv.models import adapter_for

    v_old = v1.config.text_config.vocab_size
    for task, k in (("needle", 8), ("text_needle", 6), ("video_colour", None), ("video_direction", None)):
        for s in heldout_set(task, 3, k, seed=777):
            a = adapter_for(v1).prepare(v1, proc1, s.chat).inputs
            b = adapter_for(v2).prepare(v2, proc2, s.chat).inputs
            assert torch.equal(a["input_ids"], b["input_ids"])
            with torch.no_grad():
                l1 = v1(**a).logits
                l2 = v2(**b).logits
            assert torch.allclose(l2[..., :v_old], l1, atol=2e-3, rtol=1e-4), float((l2[..., :v_old] - l1).abs().max())
            assert float(l2[..., v_old:].max(-1).values.sub(l1.max(-1).values).max()) < -1.0  # new tokens never win
            o1 = mmkv.generate(v1, proc1, s.chat, method="full", max_new_tokens=16, record_attention=False)
            o2 = mmkv.generate(v2, proc2, s.chat, method="full", max_new_tokens=16, record_attention=False)
            assert o2.text == o1.text, (
                o1.text,
                o2.text,
            )  # the same answers, right or wrong (v1 gets 85% of video_direction)


@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="the teaching model is not in mmkv/assets/")
def test_v2_stages_chain_from_stage_outputs(tmp_path):
    """scripts/train_tiny_v2.sh's mechanics: a v2 stage starts from a grown model dir, writes its stage output
    (model, aux heads, metrics, log, args; no optimizer), the next stage starts from that output, and an
    interrupted stage resumes from its checkpoint; a v2 run never exports to the shipped model's folder."""
    from training.tiny.grow import main as grow_main
    from training.tiny.train import main

    assert grow_main([str(tmp_path / "g0")]) == 0
    common = [
        "--arch",
        "v2",
        "--batch",
        "3",
        "--eval-n",
        "1",
        "--eval-every",
        "100",
        "--log-every",
        "1",
        "--threads",
        "1",
        "--k-start",
        "2",
        "--k-max",
        "3",
        "--spot-frac",
        "0.34",
        "--video-frac",
        "0.33",
        "--count-frac",
        "0.5",
        "--retrieval-weight",
        "1",
        "--diff-weight",
        "1",
        "--presence-weight",
        "1",
        "--diff-pos-weight",
        "10",
        "--spot-retrieval",
        "--weights",
        "needle=1,text_needle=1,spot_difference=1,count=1,video_direction=1,video_colour=1",
    ]
    before = (ASSET / "model.safetensors").stat().st_mtime
    assert (
        main(
            [
                "--work",
                str(tmp_path / "w1"),
                "--init",
                str(tmp_path / "g0"),
                "--stage-out",
                str(tmp_path / "s1"),
                "--steps",
                "2",
                *common,
            ]
        )
        == 0
    )
    out = tmp_path / "s1"
    assert {"model.safetensors", "aux.safetensors", "metrics.json", "log.jsonl", "args.json", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not any(p.suffix == ".pt" for p in out.iterdir())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and set(metrics["heldout_accuracy"]) >= {"needle@8", "spot_difference", "count@8"}
    assert (ASSET / "model.safetensors").stat().st_mtime == before
    # the next stage starts from the stage output; stopped at step 1, it resumes from its checkpoint
    assert (
        main(
            [
                "--work",
                str(tmp_path / "w2"),
                "--init",
                str(out),
                "--stage-out",
                str(tmp_path / "s2"),
                "--steps",
                "2",
                "--stop-at",
                "1",
                *common,
            ]
        )
        == 0
    )
    assert not (tmp_path / "s2").exists()
    assert (
        main(
            [
                "--work",
                str(tmp_path / "w2"),
                "--init",
                str(out),
                "--stage-out",
                str(tmp_path / "s2"),
                "--steps",
                "2",
                *common,
            ]
        )
        == 0
    )
    log = [json.loads(line) for line in (tmp_path / "w2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "start"] == [0, 1]
    assert json.loads((tmp_path / "s2" / "metrics.json").read_text())["steps"] == 2
    rec = next(r for r in log if "retrieval_mass" in r)
    assert 0.0 < rec["retrieval_mass"] <= 1.0
    assert any("aux_acc_presence" in r for r in log)
    from safetensors.torch import load_file

    assert {k.split(".")[0] for k in load_file(str(tmp_path / "s2" / "aux.safetensors"))} == {
        "cells",
        "motion",
        "bind",
        "diff",
        "presence",
    }


def test_v2_probe_labels_mark_changed_cells_and_image_colours(v2_processor):
    """The changed-cell labels of a two-picture scene are exactly the cells whose rendered content differs
    (both pictures alike), other visual tokens are ignored; colour-presence labels sit on each image's
    <|vision_end|> token and list the colours drawn in that image."""
    import numpy as np

    from mmkv.tiny.tasks import CELL
    from training.tiny.train import FastEncoder

    enc = FastEncoder(v2_processor)
    rng = random.Random(12)
    spot = make_episode(rng, kind="spot")
    eps = [make_episode(rng, k=3, kind="count", size=168), spot, make_episode(rng, kind="video")]
    batch = enc.encode(eps)
    per = [36] * 3 + [49, 49] + [64]
    assert batch["aux_diff"].shape[0] == sum(per) == int((batch["mm_token_type_ids"] > 0).sum())
    d = batch["aux_diff"].split(per)
    assert all((x == -100).all() for x in (d[0], d[1], d[2], d[5]))
    assert torch.equal(d[3], d[4]) and int(d[3].sum()) >= 1
    (a, _), (b, _) = [render_image(objs, 196, spot.scene.shaded) for objs in spot.scene.images]
    pa, pb = np.asarray(a).astype(int), np.asarray(b).astype(int)
    moved = np.abs(pa - pb).sum(-1) > 0
    cells = moved.reshape(7, CELL, 7, CELL).sum((1, 3)).reshape(-1)
    assert all(cells[i] > 0 for i in np.nonzero(d[3].numpy())[0])  # every marked cell changed on screen
    end = v2_processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    rows, pos = batch["presence_row"], batch["presence_pos"]
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert all(int(batch["input_ids"][r, p]) == end for r, p in zip(rows.tolist(), pos.tolist()))
    objs = eps[0].scene.images + spot.scene.images
    for v, o in zip(batch["aux_presence"].tolist(), objs):
        assert [c for c, x in zip(COLOUR_NAMES, v) if x] == [c for c in COLOUR_NAMES if c in {s.colour for s in o}]


def test_v2_spot_retrieval_target_is_the_changed_cells_of_both_pictures(v2_processor):
    from training.tiny.train import FastEncoder

    enc = FastEncoder(v2_processor)
    enc.spot_retrieval = True
    tok = v2_processor.tokenizer
    eps = [make_episode(random.Random(f"spot{i}"), kind="spot") for i in range(6)]
    batch = enc.encode(eps)
    assert batch["retrieval_row"].tolist() == list(range(6))
    visual = batch["mm_token_type_ids"] > 0
    diff = batch["aux_diff"]
    offset = 0
    for row, ep in enumerate(eps):
        q = int(batch["retrieval_query"][row])
        word = tok.convert_ids_to_tokens(int(batch["labels"][row, q + 1])).strip()
        assert word == ep.turns[0][2].split()[1]  # the colour word of "The orange square moved."
        positions = visual[row].nonzero().flatten()
        changed = positions[diff[offset : offset + len(positions)] == 1]
        assert torch.equal(batch["retrieval_mask"][row].nonzero().flatten(), changed) and len(changed) >= 2
        offset += len(positions)
    enc.spot_retrieval = False
    assert "retrieval_row" not in enc.encode(eps)


def test_v2_pictures_show_where_they_are_and_v1_pictures_stay_flat():
    """v2 scenes (168/196 px) are drawn on the position-shaded background (red grows left to right, blue top to
    bottom), so a moved shape changes what surrounds it; v1's 112 px scenes keep the flat grey of the shipped model."""
    import numpy as np

    from mmkv.tiny.tasks import BACKGROUND

    for task, k, size in (("spot_difference", None, None), ("count", 5, None), ("needle", 3, 168)):
        s = make_sample(task, 0, k, size=size)
        assert s.scene.shaded
        img = np.asarray(s.chat[0]["content"][0]["image"]).astype(int)
        _, lab = render_image(s.scene.images[0], s.scene.size, True)
        bg = lab == 0
        for y in (0, s.scene.size - 1):  # the top and bottom rows: red rises left to right, blue is the row's
            xs = np.nonzero(bg[y])[0]
            assert (np.diff(img[y, xs, 0]) >= 0).all() and img[y, xs[-1], 0] - img[y, xs[0], 0] >= 30
        assert img[-1, 0, 2] - img[0, 0, 2] >= 30
    v1 = make_sample("needle", 0, 3)
    assert not v1.scene.shaded
    img = np.asarray(v1.chat[0]["content"][0]["image"])
    _, lab = render_image(v1.scene.images[0])
    assert (img[lab == 0] == BACKGROUND).all()
