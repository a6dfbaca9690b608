"""The same input through every entry point gives the same prompt and the same answer, token for token.

The CLI (``mmkv run``), the Python API (``mmkv.chat`` + ``mmkv.generate``), the eval harness
(``mmkv.experiments.eval.evaluate``) and the app's own handlers (``mmkv.ui.handlers.chat_turn``, no Gradio) answer
the bundled needle example with a compressed cache; their prompts and generated ids must be identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mmkv
from mmkv import EXAMPLES_DIR
from mmkv.models import adapter_for

METHOD, BUDGET, NEW_TOKENS = "snapkv", 0.3, 16
EXAMPLE = json.loads((EXAMPLES_DIR / "examples.json").read_text())[
    0
]  # eight images: "Which image has the orange circle?"
FILES = [str(EXAMPLES_DIR / f) for f in EXAMPLE["files"]]


@dataclass
class _Sample:
    task: str
    chat: list[dict[str, Any]]

    def check(self, answer: str) -> bool:
        return "image 1" in answer


def _cli(tmp_path: Path) -> list[int]:
    from mmkv.cli import main

    trace = tmp_path / "trace.json"
    args = [
        "run",
        "--method",
        METHOD,
        "--budget",
        str(BUDGET),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--prompt",
        EXAMPLE["text"],
        "--trace",
        str(trace),
    ]
    for f in FILES:
        args += ["--image", f]
    assert main(args) == 0
    return json.loads(trace.read_text())["generated_ids"]


def _api(model, processor) -> list[int]:
    chat = mmkv.chat(EXAMPLE["text"], images=FILES)
    return mmkv.generate(model, processor, chat, METHOD, BUDGET, max_new_tokens=NEW_TOKENS).token_ids


def _eval(model, processor) -> list[int]:
    from mmkv.experiments.eval import evaluate
    from mmkv.experiments.records import ResultStore

    store = ResultStore()
    evaluate(
        model,
        processor,
        [_Sample("needle", mmkv.chat(EXAMPLE["text"], images=FILES))],
        [METHOD],
        [BUDGET],
        max_new_tokens=NEW_TOKENS,
        store=store,
    )
    (cell,) = [r for r in store.finished().values() if r["method"] == METHOD]
    return cell["samples"][0]["token_ids"]


def _app() -> list[int]:
    from mmkv.ui.handlers import AppState, chat_turn
    from mmkv.ui.models import ModelStore

    state = AppState()
    updates = list(
        chat_turn(
            ModelStore(str(mmkv.BUNDLED_MODEL)),
            state,
            {"text": EXAMPLE["text"], "files": FILES},
            METHOD,
            BUDGET,
            0,
            True,
            NEW_TOKENS,
        )
    )
    assert updates[-1].done
    return state.runs[state.last].trace.generated_ids


def test_cli_api_eval_and_app_give_token_identical_answers(bundled, tmp_path):
    model, processor = bundled
    answers = {"cli": _cli(tmp_path), "api": _api(model, processor), "eval": _eval(model, processor), "app": _app()}
    assert all(ids == answers["api"] for ids in answers.values()), answers
    assert len(answers["api"]) >= 3


def test_full_answers_the_example_and_labels_come_from_the_template(bundled):
    """Full answers the needle example; the prompt carries "Image k:" before each image, written by the
    bundled model's chat template (the callers pass bare images), and ``add_vision_id=False`` drops them."""
    from mmkv.models.base import render_chat

    model, processor = bundled
    chat = mmkv.chat(EXAMPLE["text"], images=FILES)
    assert not any(p["type"] == "text" and p["text"].startswith("Image") for p in chat[0]["content"])
    rendered = render_chat(processor, chat)
    assert [rendered.count(f"Image {k}:<|vision_start|>") for k in range(1, len(FILES) + 1)] == [1] * len(FILES)
    result = mmkv.generate(model, processor, chat, "full", 1.0, max_new_tokens=NEW_TOKENS)
    assert result.text == "The orange circle is in image 1."
    from transformers.processing_utils import ProcessorMixin

    bare = ProcessorMixin.apply_chat_template(
        processor,
        chat,
        chat_template=processor.chat_template,
        tokenize=False,
        add_generation_prompt=True,
        add_vision_id=False,
    )
    assert "Image 1:" not in bare and bare.count("<|vision_start|>") == len(FILES)
    prepared = adapter_for(model).prepare(model, processor, chat)
    from PIL import Image

    side = Image.open(FILES[0]).size[0] // 28  # 14 px patches, 2 x 2 merged: one token per 28 px cell
    assert prepared.modality.counts()["image"] == len(FILES) * side * side


def test_the_shipped_template_is_the_trainers(bundled):
    from mmkv.tiny.tokenizer import CHAT_TEMPLATE

    assert (mmkv.BUNDLED_MODEL / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_empty_prompts_are_refused_everywhere(tmp_path, capsys):
    from mmkv.cli import main

    with pytest.raises(ValueError, match="prompt is empty"):
        mmkv.chat("   ", images=FILES[:1])
    assert main(["run", "--prompt", " ", "--image", FILES[0]]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["run", "--prompt", "hi", "--trace", str(tmp_path / "missing" / "t.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--prompt", "hi", "--image", str(tmp_path / "nope.png")]) == 2
    assert "no such file" in capsys.readouterr().err
