"""Scenes of the synthetic benchmark: a few coloured shapes and an optional word, sampled deterministically.

A scene is pure geometry (names and pixel boxes); `render` draws it and `language` describes it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

Box = tuple[int, int, int, int]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 110, 255),
    "yellow": (245, 225, 40),
    "purple": (160, 70, 230),
    "orange": (255, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 225, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: dict[str, float] = {"small": 0.16, "large": 0.28}  # side of the bounding box, as a fraction of the image
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "car", "box", "hat", "cup", "map", "pen", "key",
    "fish", "bird", "tree", "book", "moon", "ship", "lamp", "door", "ball", "milk",
)  # fmt: skip
# Never seen in train/val/test; every compositional scene holds at least one. Each shape once, each colour at most once.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "square"),
    ("blue", "star"),
    ("yellow", "circle"),
    ("purple", "cross"),
    ("orange", "diamond"),
)
MAX_OBJECTS = 4
WORD_PROBABILITY = 0.5
WORD_CHAR_WIDTH = 0.13  # word box width per character and height, as fractions of the image
WORD_HEIGHT = 0.2
_GAP = 2  # pixels kept free between any two boxes, so every pair is separated on some axis
_TRIES = 50


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    box: Box


@dataclass(frozen=True)
class Scene:
    objects: list[SceneObject]
    word: str | None
    word_box: Box | None
    image_size: int


def sample_scene(
    rng: random.Random,
    image_size: int = 64,
    with_text: bool = True,
    compositional: bool = False,
    fractions: Mapping[str, float] = SIZES,
) -> Scene:
    """Sample 1-4 objects (and maybe a word) at non-overlapping positions; `compositional` forces a held-out pair.

    `fractions` gives each size name's side as a fraction of the image (another style draws them at other sizes).
    """
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
    n = rng.randint(1, MAX_OBJECTS)
    combos = [rng.choice(allowed) for _ in range(n)]
    if compositional:
        combos[rng.randrange(n)] = rng.choice(HELD_OUT)
    sizes = [rng.choice(list(SIZES)) for _ in range(n)]
    word = rng.choice(WORDS) if with_text and rng.random() < WORD_PROBABILITY else None
    extents = [(round(fractions[z] * image_size),) * 2 for z in sizes]
    if word is not None:
        extents.append((round(len(word) * WORD_CHAR_WIDTH * image_size), round(WORD_HEIGHT * image_size)))
    boxes = _place(rng, extents, image_size)
    objects = [SceneObject(shape=s, color=c, size=z, box=b) for (c, s), z, b in zip(combos, sizes, boxes)]
    return Scene(objects=objects, word=word, word_box=boxes[n] if word else None, image_size=image_size)


def _place(rng: random.Random, extents: list[tuple[int, int]], image_size: int) -> list[Box]:
    """Rejection-sample a box per (width, height), largest first, restarting when the canvas is too crowded."""
    order = sorted(range(len(extents)), key=lambda i: -extents[i][0] * extents[i][1])
    for _ in range(_TRIES):
        placed: dict[int, Box] = {}
        for i in order:
            box = _free_box(rng, extents[i], image_size, list(placed.values()))
            if box is None:
                break
            placed[i] = box
        else:
            return [placed[i] for i in range(len(extents))]
    raise ValueError(f"cannot fit {len(extents)} boxes into a {image_size}px image; use a larger image_size")


def _free_box(rng: random.Random, extent: tuple[int, int], image_size: int, taken: list[Box]) -> Box | None:
    """A uniformly placed box at least `_GAP` pixels from the border and from every taken box, or None."""
    w, h = extent
    for _ in range(_TRIES):
        x0 = rng.randint(_GAP, image_size - _GAP - w)
        y0 = rng.randint(_GAP, image_size - _GAP - h)
        box = (x0, y0, x0 + w, y0 + h)
        if all(_apart(box, t) for t in taken):
            return box
    return None


def _apart(a: Box, b: Box) -> bool:
    """Whether the boxes are at least `_GAP` pixels apart horizontally or vertically."""
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]
