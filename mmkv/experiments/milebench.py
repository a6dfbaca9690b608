"""Read MileBench-format data from a local folder and score answers exactly as the official runner does.

MileBench (Song et al., 2024) ships one folder per dataset::

    <root>/<Dataset>/<Dataset>.json      # {"meta_data": {...}, "data": [...]}
    <root>/<Dataset>/images/...          # paths in the JSON are relative to this folder

``meta_data`` holds ``task_instruction`` (a list of strings) and ``question_type`` (``"multi-choice"`` or
``"open-ended"``). Each ``data`` item has ``sample_id``, ``task_instruction_id``, ``response`` (the
reference answer), ``image_quantity_level`` and ``task_instance`` = ``{"context": ..., "images_path": [...],
"choice_list": [...] (multi-choice only)}``; the context marks where the images go with ``{image#k}`` (or
``{table#k}``). The adversarial variant is ``<Dataset>-adv.json`` (``adv=True``); the combined-image
variant is ``<Dataset>_combined_<N>.json`` with its images in ``combined_<N>_images/``
(``combine_images=N``).

**Prompt** (as the official ``MileBenchDataset``): the task instruction, a newline, then the context with
the images in place, and for items with a ``choice_list`` ``"\\nChoice list: \\n"``, one ``"A. option"``
line per choice (no letters for GPR1200) and ``"\\nYour answer is: "``. Images go to the placeholders in
order of appearance. Long prompts are cut from the left by tokens (:func:`truncate_left`): the
instruction and the end of the context (the question) always stay.

**Scoring** (``scoring="official"``, the default): the rules of the official ``evaluate.py`` with the
``rouge`` 1.0.1 package, quirks included (see ``docs/eval.md``): ``*NeedleInAHaystack`` datasets score 1
when the reference is one of the answer's words, MMCoQA when it is a substring; multi-choice answers are
mapped to option letters by :func:`match_choice_official` (an empty answer reads as "C", and when no rule
matches every option letter in the answer is returned); open-ended answers get
:func:`rouge_l_official`. ``scoring="clean"`` keeps the same normalisation and needle rules but scores
multi-choice by :func:`match_choice` (one letter or nothing) and open-ended answers by the textbook
ROUGE-L F1 (:func:`rouge_l`).

Every item is checked when the data is read (:func:`load_milebench`), before anything is generated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MileBenchSample",
    "load_milebench",
    "list_datasets",
    "normalise",
    "rouge_l",
    "rouge_l_official",
    "match_choice",
    "match_choice_official",
    "score_answer",
    "truncate_left",
    "SCORINGS",
]

SCORINGS = ("official", "clean")
QUESTION_TYPES = ("multi-choice", "open-ended")
PLACEHOLDER = re.compile(r"\{(?:image|table)#(\d+)\}")
NO_LETTER_DATASETS = ("GPR1200",)
_MARK = "\x00IMAGE\x00"  # stands for an image in a context string while it is cut

# ---------------------------------------------------------------------------------------------
# Normalisation (the official ``Eval.process``)
# ---------------------------------------------------------------------------------------------

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a full stop not followed by a digit (decimals like 3.5 stay)
_THOUSANDS = re.compile(r"(\d)(,)(\d)")
_PERIODS_REMOVED = 32  # the official call passes re.UNICODE (= 32) where re.sub takes its count


def normalise(text: str) -> str:
    """The official answer normalisation: newlines/tabs to spaces, punctuation handled, lower case.

    A mark from the official list is deleted when it touches a space anywhere in the text (or when the
    text has a 1,000-style number), else replaced by a space; the first 32 full stops not followed by a
    digit are deleted; then ``'`` and then ``"`` characters are stripped from the ends (before the
    surrounding spaces are), and the result is stripped and lower-cased.
    """
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    original, out = text, text
    thousands = _THOUSANDS.search(original) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in original or " " + p in original) or thousands else " ")
    out = _PERIOD.sub("", out, count=_PERIODS_REMOVED)
    return out.strip("'").strip('"').strip().lower()


# ---------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------


def _lcs_table(x: Sequence[str], y: Sequence[str]) -> list[list[int]]:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table


def rouge_l(prediction: str, reference: str) -> float:
    """Textbook ROUGE-L F1 over whitespace words: LCS / length for precision and recall, harmonic mean."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return 0.0
    lcs = _lcs_table(p, r)[-1][-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _sentences(text: str) -> list[list[str]]:
    """rouge 1.0.1's reading of a text: sentences split on ".", runs of whitespace collapsed, words on " "."""
    return [" ".join(s.split()).split(" ") for s in text.split(".") if len(s) > 0]


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """The words of the one LCS of ``x`` and ``y`` that rouge 1.0.1 reconstructs (its tie-breaking)."""
    table = _lcs_table(x, y)
    i, j, words = len(x), len(y), set()
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_official(prediction: str, reference: str) -> float:
    """ROUGE-L F as ``rouge`` 1.0.1 computes it (``Rouge().get_scores(prediction, reference)[0]["rouge-l"]["f"]``).

    Summary-level ROUGE-L with distinct words: both texts are split into sentences on ".", the LCS of
    every reference sentence with every predicted sentence is reconstructed and its words pooled into
    one *set*; recall = |set| / distinct reference words, precision = |set| / distinct predicted words,
    F = 2PR / (P + R + 1e-8). Repeated words therefore count once ("red red red red car" vs "the red car"
    scores 0.80, the textbook F1 0.50), and a perfect answer scores 0.999999995 rather than 1.
    """
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        raise ValueError("Collections must contain at least 1 sentence.")  # what rouge 1.0.1 raises
    m = len({w for s in ref for w in s})
    n = len({w for s in hyp for w in s})
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union |= _lcs_words(r, h)
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


# ---------------------------------------------------------------------------------------------
# Multi-choice
# ---------------------------------------------------------------------------------------------


def option_key(index: int) -> str:
    """The official option keys: A..Z, then AA..AZ, then BA, BB, ... (only GPR1200 has more than 26)."""
    if index < 26:
        return chr(65 + index)
    return ("A" + chr(65 + index - 26)) if index < 52 else ("B" + chr(65 + index - 52))


def match_choice_official(text: str, options: dict[str, str]) -> str:
    """The official ``match_choice``: ``text`` and the option texts are already normalised.

    1. ``""`` -> ``"C"`` (whatever the options).
    2. The earliest ``"<key> <option>"`` (normalised, lower case) in the text; ties go to the earlier
       option; the answer is the first character of the match, upper-cased (so "AA ..." gives "A").
    3. The earliest option text in the text with spaces removed on both sides; it counts only when it
       equals an option's text *as escaped for the regular expression* (an option with ``.``, ``+``,
       ``$`` ... never counts here).
    4. A text of one or two characters that is a key, upper-cased.
    5. Otherwise every character of the text whose upper case is a key, joined ("option b" -> "B",
       "the answer is b" -> "AB", "" when none).
    """
    if text == "":
        return "C"

    def escaped(option: str) -> str:
        return re.sub(r"([\\.^$*+?{}\[\]|()])", r"\\\1", normalise(option))

    try:
        found = re.search("(" + "|".join(escaped(f"{k} {v}") for k, v in options.items()) + ")", text, re.S)
        if found:
            return found.group(0)[0].upper()
        found = re.search(
            "(" + "|".join(escaped(v).replace(" ", "") for v in options.values()) + ")", text.replace(" ", ""), re.S
        )
        if found:
            for k, v in options.items():
                if found[0].strip() == escaped(v).replace(" ", ""):
                    return k.upper()
        if len(text) in (1, 2) and text.upper() in options:
            return text.upper()
    except re.error:  # the official code returns the text itself on any error
        return text
    return "".join(ch.upper() for ch in text if ch.upper() in options)


def match_choice(answer: str, choices: Sequence[str]) -> str | None:
    """Clean letter matching: ``"B option"`` first, then an option's text, then a bare letter; else ``None``."""
    letters = [chr(65 + i) for i in range(len(choices))]
    text = normalise(answer)
    if not text:
        return None
    opts = [normalise(c) for c in choices]
    found = [
        (m.start(), letter)
        for letter, o in zip(letters, opts)
        if (m := re.search(re.escape(f"{letter.lower()} {o}"), text))
    ]
    if found:
        return min(found)[1]
    squeezed = text.replace(" ", "")
    found = [
        (squeezed.find(o.replace(" ", "")), letter)
        for letter, o in zip(letters, opts)
        if o and o.replace(" ", "") in squeezed
    ]
    if found:
        return min(found)[1]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    return None


def _rule(dataset: str, question_type: str) -> str:
    """Which official rule scores ``dataset``: "needle", "substring", "multi-choice" or "rouge"."""
    if "NeedleInAHaystack" in dataset:
        return "needle"
    if "MMCoQA" in dataset:
        return "substring"
    if question_type == "multi-choice":
        return "multi-choice"
    if question_type == "open-ended":
        return "rouge"
    raise ValueError(
        f"{dataset}: question_type {question_type!r} is not one of {', '.join(QUESTION_TYPES)} "
        "(the official scorer stops with 'Dataset not supported')"
    )


def score_answer(
    dataset: str,
    question_type: str,
    reference: str,
    answer: str,
    choices: Sequence[str] = (),
    scoring: str = "official",
) -> float:
    """The score of ``answer`` for one item: 1/0, or ROUGE-L F for open-ended datasets."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    rule = _rule(dataset, question_type)
    ref, pred = normalise(reference), normalise(answer)
    if rule == "needle":
        return float(ref in pred.split())
    if rule == "substring":
        return float(ref in pred)
    if rule == "multi-choice":
        norm = [normalise(c) for c in choices]
        if ref not in norm:
            raise ValueError(f"{dataset}: the reference {reference!r} is not one of its choices {list(choices)}")
        if scoring == "clean":
            return float(match_choice(answer, choices) == chr(65 + norm.index(ref)))
        options = {option_key(i): c for i, c in enumerate(norm)}
        return float(match_choice_official(pred, options) == option_key(norm.index(ref)))
    if not ref:
        raise ValueError(f"{dataset}: the reference {reference!r} is empty once normalised")
    if scoring == "clean":
        return rouge_l(pred, ref)
    return 0.0 if pred == "" else rouge_l_official(pred, ref)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def truncate_left(
    instruction: str,
    context: str,
    images: Sequence[str],
    count_text: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    max_tokens: int,
    image_tokens: Callable[[str], int],
    with_images: bool = True,
) -> tuple[str, list[str]]:
    """The official left truncation of ``context`` (images marked by ``_MARK``) to ``max_tokens``.

    From the end: a text piece is kept whole while it fits (the last piece, when it alone does not fit,
    keeps its last tokens and nothing before it stays), then the image before it while that fits; it
    stops at the first piece or image that does not fit. The instruction's tokens count against the
    limit and it always stays. Returns the kept context (with marks) and the kept images. Pieces kept
    whole are returned as written; only a cut piece is decoded from its tokens.
    """
    room = max_tokens - len(count_text(instruction))
    pieces = context.split(_MARK)
    left = list(images)
    kept: list[str] = []
    kept_images: list[str] = []
    used, image_first = 0, False
    for piece in reversed(pieces):
        ids = count_text(piece)
        if len(ids) + used > room:
            if not kept:
                kept.insert(0, decode(ids[-room:]))
            break
        image_first = False
        kept.insert(0, piece)
        used += len(ids)
        if with_images and left:
            cost = image_tokens(left[-1])
            if cost + used > room:
                break
            image_first = True
            kept_images.insert(0, left.pop())
            used += cost
    return (_MARK if image_first else "") + _MARK.join(kept), kept_images


@dataclass
class MileBenchSample:
    """One MileBench item; ``task`` is the dataset name (the eval harness groups by it).

    ``chat`` is the whole prompt; :meth:`chat_for` gives the prompt a model sees, cut from the left to
    ``max_context_tokens`` (``None``: the model's context less ``max_new_tokens``) as the official
    runner does.
    """

    task: str
    sample_id: Any
    answer: str
    question_type: str
    instruction: str
    context: str  # with the choice block, images as _MARK
    images: list[str]
    choices: list[str] = field(default_factory=list)
    image_quantity_level: str | None = None
    combined: bool = False
    scoring: str = "official"
    max_context_tokens: int | None = None
    max_new_tokens: int = 512
    tokens_per_image: int | None = None

    def check(self, answer: str) -> float:
        return score_answer(self.task, self.question_type, self.answer, answer, self.choices, self.scoring)

    @property
    def chat(self) -> list[dict[str, Any]]:
        return self._chat(self.context, self.images)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def _chat(self, context: str, images: Sequence[str]) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []

        def text(s: str) -> None:
            if not s:
                return
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += s
            else:
                content.append({"type": "text", "text": s})

        head = f"{self.instruction}\n" if self.instruction else ""
        if self.combined:  # the official layout: the combined image, a newline, the instruction, the context
            content.append({"type": "image", "image": images[0]})
            text("\n" + head + context)
            return [{"role": "user", "content": content}]
        text(head)
        pieces = context.split(_MARK)
        for piece, image in zip(pieces, images):
            text(piece)
            content.append({"type": "image", "image": image})
        text(pieces[-1])
        return [{"role": "user", "content": content}]

    def chat_for(self, model: Any, processor: Any) -> list[dict[str, Any]]:
        """The prompt as the official runner would give ``model``: cut from the left to the token limit."""
        limit = self.max_context_tokens
        if limit is None:
            cfg = model.config.get_text_config(decoder=True)
            limit = getattr(cfg, "max_position_embeddings", None)
            if limit is None:
                return self.chat
            limit -= self.max_new_tokens
        tokenizer = getattr(processor, "tokenizer", processor)
        count = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        fixed = self.tokens_per_image
        per_image = (lambda _: fixed) if fixed else lambda p: image_tokens(model, processor, p)
        context, images = truncate_left(
            self.instruction,
            self.context,
            self.images,
            count,
            tokenizer.decode,
            limit,
            per_image,
            with_images=not self.combined,
        )
        return self._chat(context, self.images if self.combined else images)


_IMAGE_TOKENS: dict[tuple[int, tuple[int, int]], int] = {}


def image_tokens(model: Any, processor: Any, path: str) -> int:
    """Prompt tokens one image costs ``model`` (measured once per image size through its adapter)."""
    from PIL import Image

    from ..models import adapter_for

    with Image.open(path) as im:
        size = im.size
    key = (id(model), size)
    if key not in _IMAGE_TOKENS:
        adapter = adapter_for(model)

        def length(content: list[dict[str, Any]]) -> int:
            return int(adapter.prepare(model, processor, [{"role": "user", "content": content}]).input_ids.shape[-1])

        _IMAGE_TOKENS[key] = length([{"type": "image", "image": path}, {"type": "text", "text": "x"}]) - length(
            [{"type": "text", "text": "x"}]
        )
    return _IMAGE_TOKENS[key]


# ---------------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------------


def _dataset_dirs(root: Path) -> list[Path]:
    if (root / f"{root.name}.json").is_file():
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / f"{d.name}.json").is_file())


def list_datasets(root: str | Path) -> list[str]:
    """Names of the MileBench datasets under ``root`` (a MileBench folder or one dataset's folder)."""
    return [d.name for d in _dataset_dirs(Path(root))]


def _context(name: str, inst: dict[str, Any], n_images: int, combined: bool) -> str:
    """The official context: the choice block appended, then placeholders 1..n_images replaced."""
    context = str(inst["context"])
    if "choice_list" in inst:
        plain = name in NO_LETTER_DATASETS
        context += "\nChoice list: \n" + "\n".join(
            ("" if plain else f"{chr(65 + i)}. ") + f"{c}" for i, c in enumerate(inst["choice_list"])
        )
        context += "\nYour answer is: "
    for i in range(1, n_images + 1):
        for kind in ("image", "table"):
            context = context.replace(f"{{{kind}#{i}}}", f"<Image {i}> " if combined else _MARK)
    return context


def _check_item(
    name: str, qtype: str, item: dict[str, Any], instructions: list[str], folder: Path, combine_images: int | None
) -> None:
    """Raise a fixable ``ValueError`` / ``FileNotFoundError`` for anything the official runner would trip on."""
    where = f"{name} sample {item.get('sample_id')!r}"
    for key in ("sample_id", "task_instance", "response"):
        if key not in item:
            raise ValueError(f"{where}: no {key!r}")
    inst = item["task_instance"]
    if "context" not in inst or "images_path" not in inst:
        raise ValueError(f"{where}: task_instance needs 'context' and 'images_path'")
    if not 0 <= item.get("task_instruction_id", 0) < len(instructions):
        raise ValueError(
            f"{where}: task_instruction_id {item.get('task_instruction_id')} is out of range "
            f"({len(instructions)} instructions)"
        )
    rule = _rule(name, qtype)
    ref = normalise(str(item["response"]))
    if rule == "multi-choice":
        choices = inst.get("choice_list")
        if not choices:
            raise ValueError(
                f"{where}: a multi-choice item needs a non-empty 'choice_list' (the official scorer reads it)"
            )
        if ref not in [normalise(str(c)) for c in choices]:
            raise ValueError(f"{where}: the reference {item['response']!r} is not one of its choices {choices}")
    elif rule == "rouge" and not ref:
        raise ValueError(
            f"{where}: the reference answer is empty once normalised (the official scorer asserts it is not)"
        )
    images = inst["images_path"]
    marks = [int(k) for k in PLACEHOLDER.findall(str(inst["context"]))]
    beyond = [k for k in marks if not 1 <= k <= len(images)]
    if beyond:
        raise ValueError(f"{where}: the context names {{image#{beyond[0]}}} but the item lists {len(images)} images")
    if combine_images is None and len(marks) != len(images):
        raise ValueError(
            f"{where}: {len(images)} images but {len(marks)} placeholders in the context: every image "
            "needs one {image#k} (the official runner would drop or misplace the others)"
        )
    if combine_images is not None:
        combined = inst.get(f"combined_{combine_images}_images")
        if not combined or len(combined) != 1:
            raise ValueError(
                f"{where}: combine_images={combine_images} needs exactly one image in "
                f"'combined_{combine_images}_images' (the official runner supports only one)"
            )
        images = combined
    img_dir = folder / ("images" if combine_images is None else f"combined_{combine_images}_images")
    absent = [str(img_dir / p) for p in images if not (img_dir / p).is_file()]
    if absent:
        raise FileNotFoundError(f"{where}: image {absent[0]} is missing; download the dataset's images into {img_dir}")


def load_milebench(
    root: str | Path,
    datasets: Sequence[str] | None = None,
    limit: int | None = None,
    *,
    adv: bool = False,
    combine_images: int | None = None,
    scoring: str = "official",
    max_context_tokens: int | None = None,
    max_new_tokens: int = 512,
    tokens_per_image: int | None = None,
) -> list[MileBenchSample]:
    """Samples of the MileBench datasets under ``root`` (all, or the named ``datasets``), the first ``limit`` each.

    Every selected item is checked first (the reference among the choices, placeholders for every image,
    the image files, a known question type), so bad data stops the run before any generation.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    if adv and combine_images:
        raise ValueError("choose one of adv and combine_images")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no MileBench folder at {root}: pass the folder that holds <Dataset>/<Dataset>.json")
    dirs = {d.name: d for d in _dataset_dirs(root)}
    if not dirs:
        raise FileNotFoundError(
            f"{root} holds no MileBench dataset (expected <Dataset>/<Dataset>.json with images/ beside it)"
        )
    names = list(datasets) if datasets else list(dirs)
    missing = [n for n in names if n not in dirs]
    if missing:
        raise ValueError(f"no dataset {', '.join(missing)} under {root}; found {', '.join(dirs)}")
    loaded = []
    for name in names:
        folder = dirs[name]
        path = folder / (
            f"{name}-adv.json"
            if adv
            else f"{name}_combined_{combine_images}.json"
            if combine_images and combine_images != 1
            else f"{name}.json"
        )
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing (the {'adversarial' if adv else 'combined-image'} variant of {name})"
            )
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            meta, items = doc["meta_data"], doc["data"]
            instructions, qtype = list(meta["task_instruction"]), meta["question_type"]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path} is not MileBench JSON ({e!r}): expected meta_data.task_instruction, "
                "meta_data.question_type and a data list"
            ) from e
        items = items[:limit]
        ids = [item.get("sample_id") for item in items]
        if len(set(map(str, ids))) != len(ids):
            raise ValueError(f"{path}: sample_id values repeat (the official scorer keys answers by them)")
        for item in items:
            _check_item(name, qtype, item, instructions, folder, combine_images)
        loaded.append((name, folder, qtype, instructions, items))
    out: list[MileBenchSample] = []
    for name, folder, qtype, instructions, items in loaded:
        for item in items:
            inst = item["task_instance"]
            if combine_images is None:
                images = [str(folder / "images" / p) for p in inst["images_path"]]
            else:
                key = f"combined_{combine_images}_images"
                images = [str(folder / key / p) for p in inst[key]]
            out.append(
                MileBenchSample(
                    task=name,
                    sample_id=item["sample_id"],
                    answer=str(item["response"]),
                    question_type=qtype,
                    instruction=str(instructions[item.get("task_instruction_id", 0)]),
                    context=_context(name, inst, len(inst["images_path"]), combine_images is not None),
                    images=images,
                    choices=[str(c) for c in inst.get("choice_list", [])],
                    image_quantity_level=item.get("image_quantity_level"),
                    combined=combine_images is not None,
                    scoring=scoring,
                    max_context_tokens=max_context_tokens,
                    max_new_tokens=max_new_tokens,
                    tokens_per_image=tokens_per_image,
                )
            )
    return out
