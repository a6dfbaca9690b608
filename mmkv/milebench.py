"""Read MileBench-format data from a local folder and score answers the way the benchmark does.

MileBench (Song et al., 2024) ships one folder per dataset::

    <root>/<Dataset>/<Dataset>.json      # {"meta_data": {...}, "data": [...]}
    <root>/<Dataset>/images/...          # paths in the JSON are relative to this folder

``meta_data`` holds ``task_instruction`` (a list of strings) and ``question_type`` (``"multi-choice"`` or
``"open-ended"``). Each ``data`` item has ``sample_id``, ``task_instruction_id``, ``response`` (the
reference answer), ``image_quantity_level`` and ``task_instance`` = ``{"context": ..., "images_path": [...],
"choice_list": [...] (multi-choice only)}``; the context marks where image k goes with ``{image#k}`` (or
``{table#k}``).

The prompt follows the benchmark's runner: the task instruction, a newline, then the context with each
image in place, then for multi-choice items ``"\\nChoice list: \\n"``, one ``"A. option"`` line per choice
(no letters for GPR1200, whose lists are longer than the alphabet) and ``"\\nYour answer is: "``. The
whole prompt is one user message; images are passed as file paths, so they are opened only when the
sample is run.

Scoring (:meth:`MileBenchSample.check`, a number in [0, 1]) follows the benchmark's rules: answers are
normalised (newlines and tabs to spaces, punctuation removed, lower case); ``*NeedleInAHaystack`` datasets
score 1 when the reference is one of the answer's words, MMCoQA when the reference is a substring of it;
other multi-choice datasets map the answer to an option letter (``"B option text"``, then the option text,
then a bare letter) and compare letters; open-ended datasets score ROUGE-L F1 (word-level longest common
subsequence).

Readings chosen where the benchmark's runner differs or is silent:

- The runner truncates long prompts from the left to a token limit. Here ``max_images`` keeps the *last*
  ``max_images`` images and the text around them (the task instruction and the
  question always stay, as does the text just before the first kept image, which the runner's
  right-to-left truncation also keeps); samples are otherwise passed whole, and :func:`mmkv.driver.generate` refuses a
  prompt longer than the model's context with a clear error.
- An empty task instruction adds no newline (so a synthetic sample written in this format renders
  exactly like the synthetic chat; the tests rely on it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["MileBenchSample", "load_milebench", "list_datasets", "normalise", "rouge_l", "match_choice", "score_answer"]

PLACEHOLDER = re.compile(r"\{(?:image|table)#(\d+)\}")
NO_LETTER_DATASETS = ("GPR1200",)


@dataclass
class MileBenchSample:
    """One MileBench item as a chat; ``task`` is the dataset name (the eval harness groups by it)."""

    task: str
    sample_id: Any
    chat: list[dict[str, Any]]
    answer: str
    question_type: str
    choices: list[str] = field(default_factory=list)
    image_quantity_level: str | None = None
    dropped_images: int = 0

    def check(self, answer: str) -> float:
        return score_answer(self.task, self.question_type, self.answer, answer, self.choices)

    @property
    def num_images(self) -> int:
        return sum(1 for m in self.chat for p in m["content"] if p["type"] == "image")


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

_PUNCT = ";/[]\"{}()=+\\_->@`,?!<"
_PERIOD = re.compile(r"\.(?!\d)")  # a full stop not followed by a digit (decimals like 3.5 stay)
_THOUSANDS = re.compile(r"(\d),(\d)")


def normalise(text: str) -> str:
    """Lower case, newlines/tabs to spaces, punctuation removed, surrounding quotes stripped.

    As in the benchmark: a punctuation mark that appears next to a space anywhere (or any mark when the text
    has a 1,000-style number) is deleted, otherwise it becomes a space; full stops not followed by a digit go.
    """
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    original = text
    has_thousands = _THOUSANDS.search(original) is not None
    for ch in _PUNCT:
        spaced = f"{ch} " in original or f" {ch}" in original
        text = text.replace(ch, "" if spaced or has_thousands else " ")
    text = _PERIOD.sub("", text)
    return text.strip().strip("'\"").strip().lower()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace words: LCS / length for precision and recall, harmonic mean."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def match_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The option letter an answer names: ``"B option"`` first, then an option's text, then a bare letter."""
    letters = [chr(65 + i) for i in range(len(choices))]
    text = normalise(answer)
    if not text:
        return None
    opts = [normalise(c) for c in choices]
    found = [(m.start(), letter) for letter, o in zip(letters, opts) if (m := re.search(re.escape(f"{letter.lower()} {o}"), text))]
    if found:
        return min(found)[1]
    squeezed = text.replace(" ", "")
    found = [(squeezed.find(o.replace(" ", "")), letter) for letter, o in zip(letters, opts) if o and o.replace(" ", "") in squeezed]
    if found:
        return min(found)[1]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    return None


def score_answer(dataset: str, question_type: str, reference: str, answer: str, choices: Sequence[str] = ()) -> float:
    """MileBench's score of ``answer`` for one item (1/0, or ROUGE-L F1 for open-ended datasets)."""
    ref, pred = normalise(reference), normalise(answer)
    if "NeedleInAHaystack" in dataset:
        return float(ref in pred.split())
    if "MMCoQA" in dataset:
        return float(ref in pred)
    if question_type == "multi-choice":
        norm = [normalise(c) for c in choices]
        if ref not in norm:
            raise ValueError(f"{dataset}: the reference {reference!r} is not one of its choices {list(choices)}")
        return float(match_choice(answer, choices) == chr(65 + norm.index(ref)))
    return rouge_l(pred, ref)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _dataset_dirs(root: Path) -> list[Path]:
    if (root / f"{root.name}.json").is_file():
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / f"{d.name}.json").is_file())


def list_datasets(root: str | Path) -> list[str]:
    """Names of the MileBench datasets under ``root`` (a MileBench folder or one dataset's folder)."""
    return [d.name for d in _dataset_dirs(Path(root))]


def _user_content(instruction: str, context: str, images: list[Path], max_images: int | None) -> tuple[list[dict[str, Any]], int]:
    pieces = PLACEHOLDER.split(context)  # text, index, text, index, ..., text
    texts, refs = pieces[0::2], [int(i) for i in pieces[1::2]]
    for k in refs:
        if not 1 <= k <= len(images):
            raise ValueError(f"the context names {{image#{k}}} but the item lists {len(images)} images")
    dropped = 0
    if max_images is not None and len(refs) > max_images:
        dropped = len(refs) - max_images
        texts, refs = texts[dropped:], refs[dropped:]  # texts[0] is now the text just before the first kept image
    content: list[dict[str, Any]] = []

    def text(s: str) -> None:
        if not s:
            return
        if content and content[-1]["type"] == "text":
            content[-1]["text"] += s
        else:
            content.append({"type": "text", "text": s})

    text(f"{instruction}\n" if instruction else "")
    for i, k in enumerate(refs):
        text(texts[i])
        content.append({"type": "image", "image": str(images[k - 1])})
    text(texts[-1])
    return content, dropped


def load_milebench(
    root: str | Path,
    datasets: Sequence[str] | None = None,
    limit: int | None = None,
    max_images: int | None = None,
) -> list[MileBenchSample]:
    """Samples of the MileBench datasets under ``root`` (all, or the named ``datasets``), ``limit`` per dataset."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no MileBench folder at {root}: pass the folder that holds <Dataset>/<Dataset>.json")
    dirs = {d.name: d for d in _dataset_dirs(root)}
    if not dirs:
        raise FileNotFoundError(f"{root} holds no MileBench dataset (expected <Dataset>/<Dataset>.json with images/ beside it)")
    names = list(datasets) if datasets else list(dirs)
    missing = [n for n in names if n not in dirs]
    if missing:
        raise ValueError(f"no dataset {', '.join(missing)} under {root}; found {', '.join(dirs)}")
    out: list[MileBenchSample] = []
    for name in names:
        folder = dirs[name]
        try:
            doc = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            meta, items = doc["meta_data"], doc["data"]
            instructions, qtype = meta["task_instruction"], meta["question_type"]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder / (name + '.json')} is not MileBench JSON ({e!r}): expected meta_data.task_instruction, "
                             "meta_data.question_type and a data list") from e
        for item in items[:limit]:
            inst = item["task_instance"]
            images = [folder / "images" / p for p in inst.get("images_path", [])]
            absent = [str(p) for p in images if not p.is_file()]
            if absent:
                raise FileNotFoundError(f"{name} sample {item['sample_id']}: image {absent[0]} is missing; download the "
                                        "dataset's images into its images/ folder")
            choices = [str(c) for c in inst.get("choice_list", [])]
            context = inst["context"]
            if choices:
                plain = name in NO_LETTER_DATASETS
                lines = "\n".join(c if plain else f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
                context += f"\nChoice list: \n{lines}\nYour answer is: "
            content, dropped = _user_content(instructions[item.get("task_instruction_id", 0)], context, images, max_images)
            out.append(MileBenchSample(
                task=name, sample_id=item["sample_id"], chat=[{"role": "user", "content": content}],
                answer=str(item["response"]), question_type=qtype, choices=choices,
                image_quantity_level=item.get("image_quantity_level"), dropped_images=dropped,
            ))
    return out
