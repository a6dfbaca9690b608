"""Seeded synthetic multi-image and video tasks, modelled on MileBench's diagnostic tasks.

Scenes are simple coloured shapes on 112 x 112 px images (16 visual tokens each after Qwen2-VL's
2 x 2 merge of 14 px patches) and 8-frame videos of a moving ball. Every sample carries its scene,
so the answer is checkable from the scene (:func:`check_answer` recomputes it from the objects'
geometry and colours, independently of how the generator picked it).

Tasks (answers are full sentences, so the decisive token is not the first answer token):

- ``needle`` (image needle / retrieval, one hop): "Which image has the red circle?" ->
  "The red circle is in image 3." The (colour, shape) pair occurs in exactly one image.
- ``colour_at`` (attribute by index, two hops): "What colour is the square in image 2?" ->
  "The square in image 2 is blue." Shapes are distinct within an image.
- ``text_needle`` (text needle): a fact "The password is maple." sits in the text between the
  images; "What is the password?" -> "The password is maple."
- ``video_direction``: "Which way does the ball move?" -> "The ball moves left."
- ``video_colour``: "What colour is the ball in the last frame?" -> "The ball is red in the last
  frame." (the ball may change colour once; the first and last two frames are never mixed).

Teaching model v2 (``docs/tiny-v2.md``) adds two tasks and larger images (``V2_SIZES``: 168 px = 36
visual tokens, 196 px = 49 for the two-picture task), so that visual tokens are most of the prompt:

- ``spot_difference``: two pictures, identical but for one change; "What changed between the two
  pictures?" -> "The blue square turned red." / "The red circle moved." / "A green triangle appeared." (or "An orange ...") /
  "The green triangle disappeared." (shapes are distinct within a picture, so a shape names its object).
- ``count`` (needs every image, the opposite of a needle): "How many images have a red shape?" ->
  "There are three images with a red shape." / "There is one image with a red shape." / "There are no
  images with a red shape."

The v1 tasks keep their defaults (112 px, the v1 vocabulary and seeds), so the shipped model's sets
and examples are unchanged; pass ``size=`` for v2 scenes.

A :class:`Sample` is one question about a scene, as a transformers chat (images as PIL images, video
as a list of PIL frames with an ``fps`` key) plus the reference answer and a checker. An
:class:`Episode` is one scene with several question/answer turns (used for training).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..bundled import resolve_model_name
from ..inputs.prompt import chat as build_chat

__all__ = [
    "COLOURS",
    "SHAPES",
    "DIRECTIONS",
    "PASSWORDS",
    "TASKS",
    "IMAGE_TASKS",
    "VIDEO_TASKS",
    "IMAGE_SIZE",
    "CELL",
    "GRID",
    "NUM_FRAMES",
    "VIDEO_FPS",
    "Shape",
    "MultiImageScene",
    "VideoScene",
    "Episode",
    "Sample",
    "make_image_scene",
    "make_video_scene",
    "video_direction",
    "make_episode",
    "make_sample",
    "heldout_set",
    "check_answer",
    "expected_answer",
    "render_image",
    "render_frames",
    "cell_labels",
    "WORDS",
    "V2_NEW_TASKS",
    "V2_IMAGE_TASKS",
    "V2_TASKS",
    "ALL_TASKS",
    "V2_SIZES",
    "WORDS_V2",
    "NUMBER_WORDS",
    "CHANGES",
    "make_count_scene",
    "make_difference_scene",
    "difference",
    "count_answer",
    "count_question",
    "Suite",
    "V1_SUITE",
    "V2_SUITE",
    "MULTI_IMAGE_TASKS",
    "HARDEST_IMAGES",
    "suite_of",
    "shipped_tasks",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 180, 70),
    "blue": (60, 100, 235),
    "yellow": (235, 215, 50),
    "purple": (165, 70, 205),
    "orange": (245, 140, 35),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
PASSWORDS = ("apple", "river", "tiger", "cloud", "stone", "maple", "piano", "lemon", "candle", "forest")
IMAGE_TASKS = ("needle", "colour_at", "text_needle")
VIDEO_TASKS = ("video_direction", "video_colour")
TASKS = IMAGE_TASKS + VIDEO_TASKS
# v2 (docs/tiny-v2.md): two more image tasks; TASKS stays the v1 set the shipped model is held to
V2_NEW_TASKS = ("spot_difference", "count")
V2_IMAGE_TASKS = IMAGE_TASKS + V2_NEW_TASKS
ALL_TASKS = V2_IMAGE_TASKS + VIDEO_TASKS
V2_TASKS = ("needle", "text_needle", "spot_difference", "count") + VIDEO_TASKS  # what v2 is trained and held to
V2_SIZES = {"needle": 168, "colour_at": 168, "text_needle": 168, "count": 168, "spot_difference": 196}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
CHANGES = ("turned", "moved", "appeared", "disappeared")
MIN_MOVE = 28  # a moved shape travels at least one visual-token cell

IMAGE_SIZE = 112
CELL = 28  # one merged visual token covers a 28 x 28 px cell
GRID = IMAGE_SIZE // CELL  # 4 x 4 = 16 tokens per image
NUM_FRAMES = 8
VIDEO_FPS = 2.0
BACKGROUND = (40, 40, 40)
MAX_IMAGES = 8

# Every word the prompts and answers use (the tokenizer's vocabulary is built from this list).
WORDS = tuple(
    sorted(
        set(COLOUR_NAMES)
        | set(SHAPES)
        | set(DIRECTIONS)
        | set(PASSWORDS)
        | set(
            [
                "image",
                "images",
                "which",
                "what",
                "has",
                "is",
                "in",
                "the",
                "colour",
                "color",
                "shape",
                "way",
                "does",
                "ball",
                "move",
                "moves",
                "password",
                "frame",
                "first",
                "last",
                "video",
                "a",
                "an",
                "of",
                "and",
                "there",
                "are",
                "you",
                "helpful",
                "assistant",
                "user",
                "system",
                "picture",
                "shows",
                "yes",
                "no",
                "object",
                "objects",
                "where",
                "how",
                "many",
                "answer",
                "question",
            ]
        )
    )
)
# v2's extra words: appended after the v1 vocabulary (mmkv.tiny.tokenizer.vocabulary(version=2)), so every
# v1 token keeps its id and a grown model starts from v1's embeddings.
WORDS_V2 = tuple(
    sorted(
        (set(NUMBER_WORDS) | set(CHANGES) | set(["changed", "between", "pictures", "with", "have", "shape"]))
        - set(WORDS)
    )
)


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    x: float
    y: float
    r: float


@dataclass
class MultiImageScene:
    """K images of 1-2 shapes each, and optionally a text fact placed after image ``note_after``."""

    images: list[tuple[Shape, ...]]
    password: str | None = None
    note_after: int = 0  # the fact follows image ``note_after`` (0-based)
    size: int = IMAGE_SIZE  # px per side of every image
    shaded: bool = False  # drawn on the position-shaded background (v2 scenes: every size but 112 px)
    focus: str | None = None  # count scenes: the colour whose image count was drawn uniformly

    @property
    def k(self) -> int:
        return len(self.images)


@dataclass
class VideoScene:
    """A ball moving in a straight line over ``NUM_FRAMES`` frames, maybe changing colour once; an optional static shape."""

    positions: list[tuple[float, float]]
    colours: list[str]
    r: float
    distractor: Shape | None = None
    fps: float = VIDEO_FPS


def _polygon(s: Shape) -> list[tuple[float, float]]:
    return [(s.x, s.y - s.r), (s.x - s.r, s.y + 0.8 * s.r), (s.x + s.r, s.y + 0.8 * s.r)]


def _draw(draw: ImageDraw.ImageDraw, s: Shape, fill: Any) -> None:
    if s.shape == "circle":
        draw.ellipse([s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r], fill=fill)
    elif s.shape == "square":
        h = 0.85 * s.r
        draw.rectangle([s.x - h, s.y - h, s.x + h, s.y + h], fill=fill)
    else:
        draw.polygon(_polygon(s), fill=fill)


def _key(s: Shape) -> int:
    """1 + colour * 3 + shape: the label-map value of a shape (0 is background)."""
    return 1 + COLOUR_NAMES.index(s.colour) * len(SHAPES) + SHAPES.index(s.shape)


def shaded_background(size: int) -> Image.Image:
    """v2's background: dark grey whose red grows left to right and blue top to bottom (24..64 of 255), so
    every part of a picture shows where it is. Qwen2-VL's M-RoPE gives the text model the width axis only at its
    lowest frequencies (at head_dim 32 under 0.004 rad per cell), and the vision tower's RoPE is relative, so
    without such a cue a shape that moved looks the same as one that did not."""
    ramp = np.rint(24 + 40 * np.arange(size) / (size - 1)).astype(np.uint8)
    arr = np.empty((size, size, 3), dtype=np.uint8)
    arr[:, :, 0] = ramp[None, :]
    arr[:, :, 1] = BACKGROUND[1]
    arr[:, :, 2] = ramp[:, None]
    return Image.fromarray(arr, "RGB")


def render_image(
    objects: Sequence[Shape], size: int = IMAGE_SIZE, shaded: bool = False
) -> tuple[Image.Image, np.ndarray]:
    """The RGB image of ``objects`` and its label map (uint8, ``_key`` per pixel, 0 background);
    ``shaded``: on v2's :func:`shaded_background` instead of flat grey."""
    img = shaded_background(size) if shaded else Image.new("RGB", (size, size), BACKGROUND)
    lab = Image.new("L", (size, size), 0)
    d, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    for s in objects:
        _draw(d, s, COLOURS[s.colour])
        _draw(dl, s, _key(s))
    return img, np.asarray(lab)


def cell_labels(label_maps: Sequence[np.ndarray], min_pixels: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Per 28 px cell (row-major), the (colour, shape) class covering most pixels over ``label_maps``.

    Colour classes are 0 (background) and 1..6 (``COLOUR_NAMES``); shape classes 0 (none) and 1..3.
    Cells with fewer than ``min_pixels`` shape pixels are background. The grid follows the maps' size
    (4 x 4 at 112 px, 6 x 6 at 168 px).
    """
    n = len(COLOUR_NAMES) * len(SHAPES) + 1
    grid = label_maps[0].shape[0] // CELL
    counts = np.zeros(grid * grid * n, dtype=np.int64)
    offset = (np.arange(grid * grid) * n)[:, None]
    for lab in label_maps:
        cells = lab.reshape(grid, CELL, grid, CELL).transpose(0, 2, 1, 3).reshape(grid * grid, CELL * CELL)
        counts += np.bincount((cells.astype(np.int64) + offset).reshape(-1), minlength=grid * grid * n)
    counts = counts.reshape(grid * grid, n)
    counts[:, 0] = 0
    best = counts.argmax(1)
    best[counts.max(1) < min_pixels] = 0
    colour = np.where(best > 0, (best - 1) // len(SHAPES) + 1, 0)
    shape = np.where(best > 0, (best - 1) % len(SHAPES) + 1, 0)
    return colour, shape


def _place(
    rng: random.Random,
    n: int,
    shapes: Sequence[str],
    colours: Sequence[str],
    size: int = IMAGE_SIZE,
    existing: Sequence[Shape] = (),
) -> tuple[Shape, ...]:
    out: list[Shape] = []
    while len(out) < n:
        r = rng.uniform(12, 17)
        x, y = rng.uniform(r + 3, size - r - 3), rng.uniform(r + 3, size - r - 3)
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (r + o.r + 5) ** 2 for o in (*existing, *out)):
            out.append(Shape(shapes[len(out)], colours[len(out)], x, y, r))
    return tuple(out)


def _random_image(
    rng: random.Random, max_objects: int = 2, size: int = IMAGE_SIZE, colours: Sequence[str] = COLOUR_NAMES
) -> tuple[Shape, ...]:
    n = rng.randint(1, max_objects)
    return _place(rng, n, rng.sample(SHAPES, n), [rng.choice(colours) for _ in range(n)], size)


def _pair_counts(images: Sequence[Sequence[Shape]]) -> dict[tuple[str, str], list[int]]:
    where: dict[tuple[str, str], list[int]] = {}
    for k, objs in enumerate(images):
        for o in objs:
            where.setdefault((o.colour, o.shape), []).append(k)
    return where


def make_image_scene(
    rng: random.Random, k: int, password: bool | None = None, size: int = IMAGE_SIZE
) -> MultiImageScene:
    """``k`` images with at least one (colour, shape) pair that occurs exactly once."""
    if not 1 <= k <= 16:
        raise ValueError(f"k must be in 1..16, got {k}")
    while True:
        images = [_random_image(rng, size=size) for _ in range(k)]
        if any(len(v) == 1 for v in _pair_counts(images).values()):
            break
    has_pw = rng.random() < 0.5 if password is None else password
    return MultiImageScene(
        images=images,
        password=rng.choice(PASSWORDS) if has_pw else None,
        note_after=rng.randrange(k),
        size=size,
        shaded=size != IMAGE_SIZE,
    )


def make_count_scene(
    rng: random.Random, k: int, password: bool | None = None, size: int = V2_SIZES["count"]
) -> MultiImageScene:
    """``k`` images where the number of images holding a ``focus``-coloured shape is uniform in 0..k
    (the other colours fall as they may); at least one (colour, shape) pair is unique, as for ``needle``."""
    if not 1 <= k <= 16:
        raise ValueError(f"k must be in 1..16, got {k}")
    focus = rng.choice(COLOUR_NAMES)
    others = [c for c in COLOUR_NAMES if c != focus]
    while True:
        n = rng.randint(0, k)
        holders = set(rng.sample(range(k), n))
        images = []
        for i in range(k):
            objs = _random_image(rng, size=size, colours=others)
            if i in holders:  # one of the shapes takes the focus colour
                j = rng.randrange(len(objs))
                objs = tuple(Shape(o.shape, focus if m == j else o.colour, o.x, o.y, o.r) for m, o in enumerate(objs))
            images.append(objs)
        if any(len(v) == 1 for v in _pair_counts(images).values()):
            break
    has_pw = rng.random() < 0.5 if password is None else password
    return MultiImageScene(
        images=images,
        password=rng.choice(PASSWORDS) if has_pw else None,
        note_after=rng.randrange(k),
        size=size,
        focus=focus,
        shaded=size != IMAGE_SIZE,
    )


def make_difference_scene(
    rng: random.Random, size: int = V2_SIZES["spot_difference"], change: str | None = None
) -> MultiImageScene:
    """Two pictures of 1-3 shapes (distinct shapes within a picture), identical but for one ``change``
    (``CHANGES``: a shape turned another colour, moved by at least ``MIN_MOVE`` px, appeared or disappeared)."""
    change = change or rng.choice(CHANGES)
    if change not in CHANGES:
        raise ValueError(f"change must be one of {CHANGES}, got {change!r}")
    lo = 2 if change == "disappeared" else 1
    hi = 2 if change == "appeared" else 3
    n = rng.randint(lo, hi)
    first = _place(rng, n, rng.sample(SHAPES, n), [rng.choice(COLOUR_NAMES) for _ in range(n)], size)
    if change == "appeared":
        shape = rng.choice([s for s in SHAPES if s not in {o.shape for o in first}])
        second = first + _place(rng, 1, [shape], [rng.choice(COLOUR_NAMES)], size, existing=first)
        return MultiImageScene(images=[first, second], size=size, shaded=size != IMAGE_SIZE)
    if change == "disappeared":
        j = rng.randrange(n)
        return MultiImageScene(images=[first, first[:j] + first[j + 1 :]], size=size, shaded=size != IMAGE_SIZE)
    j = rng.randrange(n)
    o = first[j]
    rest = first[:j] + first[j + 1 :]
    if change == "turned":
        new = Shape(o.shape, rng.choice([c for c in COLOUR_NAMES if c != o.colour]), o.x, o.y, o.r)
    else:
        while True:
            x, y = rng.uniform(o.r + 3, size - o.r - 3), rng.uniform(o.r + 3, size - o.r - 3)
            clear = all((x - p.x) ** 2 + (y - p.y) ** 2 > (o.r + p.r + 5) ** 2 for p in rest)
            if clear and (x - o.x) ** 2 + (y - o.y) ** 2 >= MIN_MOVE**2:
                break
        new = Shape(o.shape, o.colour, x, y, o.r)
    return MultiImageScene(images=[first, first[:j] + (new,) + first[j + 1 :]], size=size, shaded=size != IMAGE_SIZE)


def make_video_scene(rng: random.Random) -> VideoScene:
    direction = rng.choice(DIRECTIONS)
    r = rng.uniform(10, 13)
    span = rng.uniform(56, 72)
    start = rng.uniform(r + 4, IMAGE_SIZE - r - 4 - span)
    cross = rng.uniform(r + 6, IMAGE_SIZE - r - 6)
    along = [start + span * i / (NUM_FRAMES - 1) for i in range(NUM_FRAMES)]
    if direction in ("left", "up"):
        along = along[::-1]
    positions = [(a, cross) if direction in ("left", "right") else (cross, a) for a in along]
    c1 = rng.choice(COLOUR_NAMES)
    colours = [c1] * NUM_FRAMES
    if rng.random() < 0.5:  # change colour at frame 2..6 (first and last temporal pairs stay pure)
        c2 = rng.choice([c for c in COLOUR_NAMES if c != c1])
        j = rng.randint(2, NUM_FRAMES - 2)
        colours = [c1] * j + [c2] * (NUM_FRAMES - j)
    distractor = None
    if rng.random() < 0.5:  # a static square or triangle away from the ball's path
        for _ in range(50):
            d = Shape(
                rng.choice(("square", "triangle")),
                rng.choice(COLOUR_NAMES),
                rng.uniform(16, 96),
                rng.uniform(16, 96),
                11,
            )
            if all((d.x - x) ** 2 + (d.y - y) ** 2 > (r + d.r + 6) ** 2 for x, y in positions):
                distractor = d
                break
    return VideoScene(positions=positions, colours=colours, r=r, distractor=distractor)


def render_frames(scene: VideoScene) -> tuple[list[Image.Image], list[np.ndarray]]:
    frames, labels = [], []
    for (x, y), c in zip(scene.positions, scene.colours):
        objs = ([scene.distractor] if scene.distractor else []) + [Shape("circle", c, x, y, scene.r)]
        img, lab = render_image(objs)
        frames.append(img)
        labels.append(lab)
    return frames, labels


# ---------------------------------------------------------------------------------------------
# Questions, answers, checker
# ---------------------------------------------------------------------------------------------

_Q = {
    "needle": re.compile(r"^Which image has the (\w+) (\w+)\?$"),
    "colour_at": re.compile(r"^What colour is the (\w+) in image (\d+)\?$"),
    "text_needle": re.compile(r"^What is the password\?$"),
    "video_direction": re.compile(r"^Which way does the ball move\?$"),
    "video_colour": re.compile(r"^What colour is the ball in the (first|last) frame\?$"),
    "spot_difference": re.compile(r"^What changed between the two pictures\?$"),
    "count": re.compile(r"^How many images have an? (\w+) shape\?$"),
}
MOVE_SEEN = 8.0  # px: a shape that shifts more than this between the pictures has moved (0 < shift <= this: ambiguous)


def count_answer(colour: str, n: int) -> str:
    """``n`` images hold a ``colour`` shape: "There are three images with a red shape." (one: "There is one
    image ...", none: "There are no images ...")."""
    a = "an" if colour[0] in "aeiou" else "a"
    if n == 1:
        return f"There is one image with {a} {colour} shape."
    return f"There are {NUMBER_WORDS[n]} images with {a} {colour} shape."


def difference(first: Sequence[Shape], second: Sequence[Shape]) -> str | None:
    """The one change from ``first`` to ``second`` as an answer sentence, recomputed from the objects
    (shapes name objects, as they are distinct within a picture); None unless exactly one thing changed."""
    a = {o.shape: o for o in first}
    b = {o.shape: o for o in second}
    if len(a) != len(first) or len(b) != len(second):
        return None
    changes = []
    for shape in SHAPES:
        if shape in a and shape not in b:
            changes.append(f"The {a[shape].colour} {shape} disappeared.")
        elif shape in b and shape not in a:
            colour = b[shape].colour
            changes.append(f"{'An' if colour[0] in 'aeiou' else 'A'} {colour} {shape} appeared.")
        elif shape in a:
            o, p = a[shape], b[shape]
            shift = ((o.x - p.x) ** 2 + (o.y - p.y) ** 2) ** 0.5
            if o.colour != p.colour:
                changes.append(f"The {o.colour} {shape} turned {p.colour}.")
            if shift > MOVE_SEEN:
                changes.append(f"The {o.colour} {shape} moved.")
            elif shift > 0 or abs(o.r - p.r) > 0:
                return None
    return changes[0] if len(changes) == 1 else None


def video_direction(scene: VideoScene) -> str:
    """The ball's direction from its first and last positions (image y grows downwards)."""
    (x0, y0), (x1, y1) = scene.positions[0], scene.positions[-1]
    dx, dy = x1 - x0, y1 - y0
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def expected_answer(scene: Any, task: str, question: str) -> str | None:
    """The answer recomputed from the scene's objects (None when the question has no unique answer)."""
    m = _Q[task].match(question)
    if m is None:
        return None
    if task == "needle":
        colour, shape = m.groups()
        holders = [
            k for k, objs in enumerate(scene.images) if any(o.colour == colour and o.shape == shape for o in objs)
        ]
        count = sum(o.colour == colour and o.shape == shape for objs in scene.images for o in objs)
        if len(holders) != 1 or count != 1:
            return None
        return f"The {colour} {shape} is in image {holders[0] + 1}."
    if task == "colour_at":
        shape, k = m.group(1), int(m.group(2))
        if not 1 <= k <= scene.k:
            return None
        found = [o.colour for o in scene.images[k - 1] if o.shape == shape]
        return f"The {shape} in image {k} is {found[0]}." if len(found) == 1 else None
    if task == "text_needle":
        return f"The password is {scene.password}." if scene.password else None
    if task == "video_direction":
        return f"The ball moves {video_direction(scene)}."
    if task == "video_colour":
        which = m.group(1)
        colour = scene.colours[0] if which == "first" else scene.colours[-1]
        return f"The ball is {colour} in the {which} frame."
    if task == "spot_difference":
        return difference(*scene.images) if scene.k == 2 else None
    if task == "count":
        colour = m.group(1)
        article = "an" if colour[0] in "aeiou" else "a"
        if colour not in COLOURS or not question.startswith(f"How many images have {article} "):
            return None
        return count_answer(colour, sum(any(o.colour == colour for o in objs) for objs in scene.images))
    raise ValueError(f"unknown task {task!r}")


def check_answer(scene: Any, task: str, question: str, answer: str) -> bool:
    """True when ``answer`` (stripped) is exactly the answer the scene implies."""
    expected = expected_answer(scene, task, question)
    return expected is not None and answer.strip() == expected


def count_question(colour: str) -> str:
    return f"How many images have {'an' if colour[0] in 'aeiou' else 'a'} {colour} shape?"


def _questions(rng: random.Random, scene: Any, task: str) -> list[str]:
    """All questions of ``task`` the scene can answer, shuffled."""
    if task == "needle":
        qs = [f"Which image has the {c} {s}?" for (c, s), ks in _pair_counts(scene.images).items() if len(ks) == 1]
    elif task == "colour_at":
        qs = [f"What colour is the {o.shape} in image {k + 1}?" for k, objs in enumerate(scene.images) for o in objs]
    elif task == "text_needle":
        qs = ["What is the password?"] if scene.password else []
    elif task == "video_direction":
        qs = ["Which way does the ball move?"]
    elif task == "video_colour":
        qs = [f"What colour is the ball in the {w} frame?" for w in ("first", "last")]
    elif task == "spot_difference":
        qs = ["What changed between the two pictures?"] if scene.k == 2 and difference(*scene.images) else []
    elif task == "count":
        qs = [count_question(c) for c in COLOUR_NAMES]
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(ALL_TASKS)}")
    rng.shuffle(qs)
    return qs


# ---------------------------------------------------------------------------------------------
# Chats, samples, episodes
# ---------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """A scene and ``turns`` of (task, question, answer)."""

    scene: Any
    turns: list[tuple[str, str, str]]
    _media: Any = field(default=None, repr=False)

    @property
    def is_video(self) -> bool:
        return isinstance(self.scene, VideoScene)

    def media(self) -> tuple[list[Image.Image], list[np.ndarray]]:
        """(images or frames, label maps), rendered once."""
        if self._media is None:
            if self.is_video:
                self._media = render_frames(self.scene)
            else:
                pairs = [render_image(objs, self.scene.size, self.scene.shaded) for objs in self.scene.images]
                self._media = ([p[0] for p in pairs], [p[1] for p in pairs])
        return self._media

    def context_parts(self) -> list[dict[str, Any]]:
        """Media of the first user message, before its question (images are labelled by the chat template)."""
        images, _ = self.media()
        if self.is_video:
            return [{"type": "video", "video": list(images), "fps": self.scene.fps}]
        parts: list[dict[str, Any]] = []
        for k, img in enumerate(images):
            parts.append({"type": "image", "image": img})
            if self.scene.password and k == self.scene.note_after:
                parts.append({"type": "text", "text": f"The password is {self.scene.password}."})
        return parts

    def chat(self, upto: int | None = None, answers: bool = False) -> list[dict[str, Any]]:
        """The chat of the first ``upto`` turns (all by default); earlier answers are always included,
        the last turn's answer only with ``answers=True``."""
        turns = self.turns[: len(self.turns) if upto is None else upto]
        chat: list[dict[str, Any]] = []
        for i, (_task, q, a) in enumerate(turns):
            chat = build_chat(q, media=self.context_parts() if i == 0 else [], history=chat)
            if i < len(turns) - 1 or answers:
                chat.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        return chat


@dataclass
class Sample:
    """One question about a scene: ``chat`` (ends with the user's question), the reference ``answer``."""

    task: str
    chat: list[dict[str, Any]]
    answer: str
    question: str
    scene: Any
    seed: Any = None

    def check(self, answer: str) -> bool:
        return check_answer(self.scene, self.task, self.question, answer)

    @property
    def num_images(self) -> int:
        return 0 if isinstance(self.scene, VideoScene) else self.scene.k

    def episode(self) -> Episode:
        return Episode(self.scene, [(self.task, self.question, self.answer)])


def make_episode(
    rng: random.Random,
    k: int | None = None,
    video: bool = False,
    max_turns: int = 6,
    weights: dict[str, float] | None = None,
    password_frac: float | None = None,
    kind: str | None = None,
    size: int | None = None,
) -> Episode:
    """One scene (``k`` images, or a video) with 1..``max_turns`` questions drawn by task ``weights``.

    ``password_frac``: probability that an image scene carries the text fact (default 0.5).
    ``kind`` (v2): ``"images"`` (the v1 scene, at ``size`` px), ``"count"`` (a count scene: ``needle``,
    ``text_needle`` and ``count`` questions), ``"spot"`` (two pictures, one ``spot_difference`` question)
    or ``"video"``; None is the v1 behaviour (``video`` picks).
    """
    weights = weights or {}
    kind = kind or ("video" if video else "images")
    if kind == "video":
        scene: Any = make_video_scene(rng)
        tasks: tuple[str, ...] = VIDEO_TASKS
    elif kind == "spot":
        scene = make_difference_scene(rng, size or V2_SIZES["spot_difference"])
        tasks = ("spot_difference",)
    elif kind in ("images", "count"):
        pw = None if password_frac is None else rng.random() < password_frac
        k = k or rng.randint(1, MAX_IMAGES)
        if kind == "count":
            scene = make_count_scene(rng, k, password=pw, size=size or V2_SIZES["count"])
            tasks = ("needle", "text_needle", "count")
        else:
            scene = make_image_scene(rng, k, password=pw, size=size or IMAGE_SIZE)
            tasks = IMAGE_TASKS
    else:
        raise ValueError(f"unknown episode kind {kind!r}")
    pools = {t: _questions(rng, scene, t) for t in tasks if weights.get(t, 1.0) > 0}
    if kind == "count" and "count" in pools:  # the focus colour's question is asked first (uniform counts)
        focus = count_question(scene.focus)
        pools["count"] = [q for q in pools["count"] if q != focus] + [focus]
    n = rng.randint(1, max_turns)
    turns: list[tuple[str, str, str]] = []
    while len(turns) < n:
        avail = [t for t, qs in pools.items() if qs]
        if not avail:
            break
        task = rng.choices(avail, [weights.get(t, 1.0) for t in avail])[0]
        q = pools[task].pop()
        answer = expected_answer(scene, task, q)
        assert answer is not None
        turns.append((task, q, answer))
    return Episode(scene, turns)


def make_sample(task: str, seed: Any, k: int | None = None, size: int | None = None) -> Sample:
    """One single-question sample of ``task``; deterministic in ``(task, seed, k, size)``.

    Image tasks use ``k`` images (default: 1..8 drawn from the seed); video tasks ignore ``k``. ``size``:
    px per image (v1 tasks default to 112 px, the shipped model's; v2's tasks to ``V2_SIZES``).
    ``spot_difference`` always shows two pictures; ``count`` asks about a colour whose image count is
    uniform in 0..k.
    """
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(ALL_TASKS)}")
    if task in V2_NEW_TASKS:
        size = size or V2_SIZES[task]
    tag = "" if size in (None, IMAGE_SIZE) or task in VIDEO_TASKS else f"/{size}px"
    rng = random.Random(f"mmkv-tiny/{task}/{seed}/{k}{tag}")
    if task in VIDEO_TASKS:
        scene: Any = make_video_scene(rng)
    elif task == "spot_difference":
        scene = make_difference_scene(rng, size or V2_SIZES[task])
    elif task == "count":
        scene = make_count_scene(rng, k or rng.randint(1, MAX_IMAGES), size=size or V2_SIZES[task])
    else:
        scene = make_image_scene(
            rng,
            k or rng.randint(1, MAX_IMAGES),
            password=True if task == "text_needle" else None,
            size=size or IMAGE_SIZE,
        )
    q = count_question(scene.focus) if task == "count" else _questions(rng, scene, task)[0]
    answer = expected_answer(scene, task, q)
    assert answer is not None
    ep = Episode(scene, [(task, q, answer)])
    return Sample(task=task, chat=ep.chat(), answer=answer, question=q, scene=scene, seed=seed)


def heldout_set(task: str, n: int, k: int | None = None, seed: int = 10_000, size: int | None = None) -> list[Sample]:
    """``n`` held-out samples (seed namespace ``heldout-<seed>``, disjoint from training's)."""
    return [make_sample(task, f"heldout-{seed}-{i}", k, size) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Suites: which tasks, at which image sizes, a model was trained on
# ---------------------------------------------------------------------------------------------

#: Tasks whose prompts hold several images (their hardest setting is ``HARDEST_IMAGES`` images);
#: ``spot_difference`` always shows two pictures and the video tasks one clip.
MULTI_IMAGE_TASKS = ("needle", "colour_at", "text_needle", "count")
HARDEST_IMAGES = 8


@dataclass(frozen=True)
class Suite:
    """The tasks a teaching model was trained on and the px per image of each (``training_metrics.json``'s
    ``"suite"``). The background follows the size (:func:`make_sample`: 112 px flat grey, larger sizes
    position-shaded); video frames are always 112 px."""

    version: int
    sizes: dict[str, int]
    tasks: tuple[str, ...]

    def size(self, task: str) -> int | None:
        """px per image for ``task`` (None: the generator's default)."""
        return self.sizes.get(task)

    def hardest(self, task: str) -> int | None:
        """Images per prompt at the task's hardest setting (None where the task fixes it)."""
        return HARDEST_IMAGES if task in MULTI_IMAGE_TASKS else None

    def heldout(self, task: str, n: int, k: int | None = None, seed: int = 10_000) -> list[Sample]:
        """:func:`heldout_set` at this suite's size for ``task``."""
        return heldout_set(task, n, None if task in VIDEO_TASKS else k, seed, self.size(task))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "tasks": list(self.tasks),
            "sizes": dict(self.sizes),
            "background": "flat" if self.version == 1 else "shaded",
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Suite:
        base = V1_SUITE if int(d["version"]) == 1 else V2_SUITE
        return cls(
            version=int(d["version"]),
            sizes={str(k): int(v) for k, v in d.get("sizes", base.sizes).items()},
            tasks=tuple(d.get("tasks", base.tasks)),
        )


_VIDEO_SIZES = {t: IMAGE_SIZE for t in VIDEO_TASKS}
#: The shipped v1 model's suite: today's defaults (112 px, flat grey), so its samples are the generator's defaults.
V1_SUITE = Suite(1, {"needle": IMAGE_SIZE, "colour_at": IMAGE_SIZE, "text_needle": IMAGE_SIZE, **_VIDEO_SIZES}, TASKS)
#: Teaching model v2's suite (docs/tiny-v2.md): 168 px (196 px for two pictures), position-shaded.
V2_SUITE = Suite(2, {**V2_SIZES, **_VIDEO_SIZES}, V2_TASKS)


def suite_of(model: str | Path | None = None) -> Suite:
    """The suite a model directory was trained on, from its ``training_metrics.json`` (``"suite"``).

    ``model``: a directory, a hub id or an alias of the bundled model (None: the bundled model). A model
    without the file or the entry (a hub id, an older export) gets :data:`V1_SUITE`, today's defaults.
    """
    path = Path(resolve_model_name("bundled" if model is None else model)) / "training_metrics.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return V1_SUITE
    suite = meta.get("suite") if isinstance(meta, dict) else None
    return Suite.from_json(suite) if isinstance(suite, dict) else V1_SUITE


def shipped_tasks(model: str | Path | None = None) -> tuple[str, ...]:
    """The tasks a model directory ships (``training_metrics.json``'s ``shipped_tasks``; empty without one)."""
    path = Path(resolve_model_name("bundled" if model is None else model)) / "training_metrics.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    return tuple(meta.get("shipped_tasks", ())) if isinstance(meta, dict) else ()
