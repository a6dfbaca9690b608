"""The lmms-eval plugin's logic against a stand-in of lmms-eval's ``Instance`` (lmms-eval itself is not a
test dependency; with it installed, the last test also runs the registered class)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass

import pytest

import mmkv
from mmkv.integrations import lmms_eval as plugin
from mmkv.tiny.tasks import suite_of

MODEL = "assets/mmkv-tiny-qwen2vl"


@dataclass
class Instance:
    """What the plugin reads of lmms-eval's ``Instance``: ``args`` for a generate_until request."""

    args: tuple


def _task(n: int = 2) -> tuple[dict, list, list]:
    """A tiny local task: the image needle's images and question as lmms-eval docs."""
    samples = suite_of(MODEL).heldout("needle", n, 3, seed=777)  # at the bundled model's image size
    docs = [
        {
            "images": [p["image"] for p in s.chat[0]["content"] if p["type"] == "image"],
            "question": s.chat[0]["content"][-1]["text"],
            "answer": s.answer,
        }
        for s in samples
    ]
    requests = [
        Instance(
            (
                f"<image><image><image>{d['question']}",
                {"max_new_tokens": 16, "until": ["\n\n"]},
                lambda doc: doc["images"],
                i,
                "tiny_needle",
                "test",
            )
        )
        for i, d in enumerate(docs)
    ]
    return {"tiny_needle": {"test": docs}}, docs, requests


@pytest.fixture(scope="module")
def loaded():
    return mmkv.load(MODEL)


def test_adapter_answers_like_the_python_api_and_logs_the_kv_ratio(loaded, tmp_path) -> None:
    model, processor = loaded
    task_dict, docs, requests = _task()
    log = tmp_path / "traces.jsonl"
    adapter = plugin.MMKVAdapter(method="snapkv", budget="0.2", trace_log=str(log), model=model, processor=processor)
    answers = adapter.generate_until(requests, task_dict)
    for doc, answer in zip(docs, answers):
        chat = [
            {
                "role": "user",
                "content": [{"type": "image", "image": im} for im in doc["images"]]
                + [{"type": "text", "text": doc["question"]}],
            }
        ]
        assert answer == mmkv.generate(model, processor, chat, "snapkv", 0.2, max_new_tokens=16).text
    assert [t["doc_id"] for t in adapter.traces] == [0, 1] and all(0.15 < t["kv_ratio"] < 0.3 for t in adapter.traces)
    assert [json.loads(x)["kv_ratio"] for x in log.read_text().splitlines()] == [t["kv_ratio"] for t in adapter.traces]


def test_request_pieces() -> None:
    assert plugin.cut_at_stop("image 2.\n\nmore", ["\n\n"]) == "image 2." and plugin.cut_at_stop("abc", None) == "abc"
    parts = plugin.visual_parts([["a.png"], "clip.mp4", None])
    assert parts == [{"type": "image", "image": "a.png"}, {"type": "video", "video": "clip.mp4"}]
    with pytest.raises(ValueError, match="unknown method"):
        plugin.MMKVAdapter(method="nope", model=object(), processor=object())


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed")
def test_model_class_needs_lmms_eval_only_when_used() -> None:
    with pytest.raises(ImportError, match=r"pip install 'mmkv\[lmms\]'"):
        plugin.MMKV  # noqa: B018


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed (mmkv[lmms])")
def test_registered_lmms_eval_model(loaded) -> None:
    from lmms_eval.api.instance import Instance as LmmsInstance
    from lmms_eval.api.model import lmms

    cls = plugin.MMKV
    assert issubclass(cls, lmms) and plugin.manifest().simple_class_path == "mmkv.integrations.lmms_eval.MMKV"
    model = cls.create_from_arg_string(f"pretrained={MODEL},method=snapkv,budget=0.2")
    task_dict, docs, requests = _task(1)
    model.task_dict = task_dict
    real = [
        LmmsInstance("generate_until", r.args, 0, {"task": "tiny_needle", "doc_id": 0, "repeats": 1}) for r in requests
    ]
    assert model.generate_until(real) == plugin.MMKVAdapter(model=loaded[0], processor=loaded[1]).generate_until(
        requests, task_dict
    )
    assert 0.15 < model.traces[0]["kv_ratio"] < 0.3
