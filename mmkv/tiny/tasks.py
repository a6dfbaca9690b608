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

A :class:`Sample` is one question about a scene, as a transformers chat (images as PIL images, video
as a list of PIL frames with an ``fps`` key) plus the reference answer and a checker. An
:class:`Episode` is one scene with several question/answer turns (used for training).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..prompt import chat as build_chat

__all__ = [
    "COLOURS", "SHAPES", "DIRECTIONS", "PASSWORDS", "TASKS", "IMAGE_TASKS", "VIDEO_TASKS", "IMAGE_SIZE",
    "CELL", "GRID", "NUM_FRAMES", "VIDEO_FPS", "Shape", "MultiImageScene", "VideoScene", "Episode", "Sample",
    "make_image_scene", "make_video_scene", "video_direction", "make_episode", "make_sample", "heldout_set", "check_answer",
    "expected_answer", "render_image", "render_frames", "cell_labels", "WORDS",
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
            "image images which what has is in the colour color shape way does ball move moves password frame "
            "first last video a an of and there are you helpful assistant user system picture shows yes no "
            "object objects where how many answer question".split()
        )
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


def render_image(objects: Sequence[Shape], size: int = IMAGE_SIZE) -> tuple[Image.Image, np.ndarray]:
    """The RGB image of ``objects`` and its label map (uint8, ``_key`` per pixel, 0 background)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    lab = Image.new("L", (size, size), 0)
    d, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    for s in objects:
        _draw(d, s, COLOURS[s.colour])
        _draw(dl, s, _key(s))
    return img, np.asarray(lab)


def cell_labels(label_maps: Sequence[np.ndarray], min_pixels: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Per 28 px cell (row-major), the (colour, shape) class covering most pixels over ``label_maps``.

    Colour classes are 0 (background) and 1..6 (``COLOUR_NAMES``); shape classes 0 (none) and 1..3.
    Cells with fewer than ``min_pixels`` shape pixels are background.
    """
    n = len(COLOUR_NAMES) * len(SHAPES) + 1
    counts = np.zeros(GRID * GRID * n, dtype=np.int64)
    offset = (np.arange(GRID * GRID) * n)[:, None]
    for lab in label_maps:
        cells = lab.reshape(GRID, CELL, GRID, CELL).transpose(0, 2, 1, 3).reshape(GRID * GRID, CELL * CELL)
        counts += np.bincount((cells.astype(np.int64) + offset).reshape(-1), minlength=GRID * GRID * n)
    counts = counts.reshape(GRID * GRID, n)
    counts[:, 0] = 0
    best = counts.argmax(1)
    best[counts.max(1) < min_pixels] = 0
    colour = np.where(best > 0, (best - 1) // len(SHAPES) + 1, 0)
    shape = np.where(best > 0, (best - 1) % len(SHAPES) + 1, 0)
    return colour, shape


def _place(rng: random.Random, n: int, shapes: Sequence[str], colours: Sequence[str]) -> tuple[Shape, ...]:
    out: list[Shape] = []
    while len(out) < n:
        r = rng.uniform(12, 17)
        x, y = rng.uniform(r + 3, IMAGE_SIZE - r - 3), rng.uniform(r + 3, IMAGE_SIZE - r - 3)
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (r + o.r + 5) ** 2 for o in out):
            out.append(Shape(shapes[len(out)], colours[len(out)], x, y, r))
    return tuple(out)


def _random_image(rng: random.Random, max_objects: int = 2) -> tuple[Shape, ...]:
    n = rng.randint(1, max_objects)
    return _place(rng, n, rng.sample(SHAPES, n), [rng.choice(COLOUR_NAMES) for _ in range(n)])


def _pair_counts(images: Sequence[Sequence[Shape]]) -> dict[tuple[str, str], list[int]]:
    where: dict[tuple[str, str], list[int]] = {}
    for k, objs in enumerate(images):
        for o in objs:
            where.setdefault((o.colour, o.shape), []).append(k)
    return where


def make_image_scene(rng: random.Random, k: int, password: bool | None = None) -> MultiImageScene:
    """``k`` images with at least one (colour, shape) pair that occurs exactly once."""
    if not 1 <= k <= 16:
        raise ValueError(f"k must be in 1..16, got {k}")
    while True:
        images = [_random_image(rng) for _ in range(k)]
        if any(len(v) == 1 for v in _pair_counts(images).values()):
            break
    has_pw = rng.random() < 0.5 if password is None else password
    return MultiImageScene(
        images=images, password=rng.choice(PASSWORDS) if has_pw else None, note_after=rng.randrange(k)
    )


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
            d = Shape(rng.choice(("square", "triangle")), rng.choice(COLOUR_NAMES), rng.uniform(16, 96), rng.uniform(16, 96), 11)
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
}


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
        holders = [k for k, objs in enumerate(scene.images) if any(o.colour == colour and o.shape == shape for o in objs)]
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
    raise ValueError(f"unknown task {task!r}")


def check_answer(scene: Any, task: str, question: str, answer: str) -> bool:
    """True when ``answer`` (stripped) is exactly the answer the scene implies."""
    expected = expected_answer(scene, task, question)
    return expected is not None and answer.strip() == expected


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
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
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
                pairs = [render_image(objs) for objs in self.scene.images]
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
) -> Episode:
    """One scene (``k`` images, or a video) with 1..``max_turns`` questions drawn by task ``weights``.

    ``password_frac``: probability that an image scene carries the text fact (default 0.5).
    """
    weights = weights or {}
    if video:
        scene: Any = make_video_scene(rng)
        tasks = VIDEO_TASKS
    else:
        pw = None if password_frac is None else rng.random() < password_frac
        scene = make_image_scene(rng, k or rng.randint(1, MAX_IMAGES), password=pw)
        tasks = IMAGE_TASKS
    pools = {t: _questions(rng, scene, t) for t in tasks if weights.get(t, 1.0) > 0}
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


def make_sample(task: str, seed: Any, k: int | None = None) -> Sample:
    """One single-question sample of ``task``; deterministic in ``(task, seed, k)``.

    Image tasks use ``k`` images (default: 1..8 drawn from the seed); video tasks ignore ``k``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"mmkv-tiny/{task}/{seed}/{k}")
    if task in VIDEO_TASKS:
        scene: Any = make_video_scene(rng)
    else:
        scene = make_image_scene(rng, k or rng.randint(1, MAX_IMAGES), password=True if task == "text_needle" else None)
    q = _questions(rng, scene, task)[0]
    answer = expected_answer(scene, task, q)
    assert answer is not None
    ep = Episode(scene, [(task, q, answer)])
    return Sample(task=task, chat=ep.chat(), answer=answer, question=q, scene=scene, seed=seed)


def heldout_set(task: str, n: int, k: int | None = None, seed: int = 10_000) -> list[Sample]:
    """``n`` held-out samples (seed namespace ``heldout-<seed>``, disjoint from training's)."""
    return [make_sample(task, f"heldout-{seed}-{i}", k) for i in range(n)]
