"""Task formatting: one stored sample becomes a (prompt, target) text pair for the task drawn for it.

Tasks mix by weight per recipe: ``contrastive`` (the caption alone, no LM loss), ``caption``, ``vqa``
(a question–answer pair from the sample's json), ``grounding`` (name an object, answer with its box as
discretised location tokens). A task a sample cannot serve (plain caption data has no questions) falls
back to captioning.

Contrastive examples may also carry ``hard_negatives`` captions from the sample's json (NegCLIP, Yuksekgonul
et al., 2023): the same scene with one colour, shape, size or relation swapped, scored as extra negatives.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from dataclasses import dataclass, field

from lightning_vlm.data.reading import RawSample

TASKS = ("contrastive", "caption", "vqa", "grounding")


@dataclass
class TextExample:
    """The text side of a training example; only `target` carries labels (none for contrastive).

    ``negatives``: hard-negative captions of a contrastive example, a fixed number per example; None pads a
    slot the sample had no negative for. ``system``: the system prompt of a generative example.
    """

    task: str
    prompt: str
    target: str
    extra: dict = field(default_factory=dict)
    negatives: list[str | None] = field(default_factory=list)
    system: str = ""


@functools.cache
def location_tokens(bins: int) -> tuple[str, ...]:
    """The vocabulary of box coordinates, one token per bin: ``<loc_00>`` ... ."""
    width = len(str(bins - 1))
    return tuple(f"<loc_{i:0{width}d}>" for i in range(bins))


def box_to_tokens(box: list[float], image_size: int, bins: int) -> str:
    """A pixel box (x0, y0, x1, y1) as four location tokens, each coordinate binned over the image side."""
    vocab = location_tokens(bins)
    return "".join(vocab[min(bins - 1, max(0, int(c / image_size * bins)))] for c in box)


@dataclass
class TaskFormatter:
    """Draws a task per sample by weight and writes its prompt and target; contrastive examples get
    ``hard_negatives`` negative captions drawn without replacement from the sample's json. ``system_prompt``
    goes with every generative example (a system message under a chat template, else text before the prompt)."""

    weights: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    caption_prompt: str = ""
    grounding_template: str = "where is the {name}?"
    loc_bins: int = 32
    hard_negatives: int = 0
    system_prompt: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; choose among {TASKS}")
        self._names = [t for t, w in self.weights.items() if w > 0]
        self._weights = [self.weights[t] for t in self._names]

    def __call__(self, sample: RawSample, image_size: int, rng: random.Random) -> TextExample:
        example = self._format(sample, image_size, rng)
        if example.task != "contrastive":
            example.system = self.system_prompt
        return example

    def _format(self, sample: RawSample, image_size: int, rng: random.Random) -> TextExample:
        task = rng.choices(self._names, self._weights)[0]
        if task == "vqa" and sample.info.get("qa"):
            qa = rng.choice(sample.info["qa"])
            return TextExample("vqa", qa["question"], qa["answer"], {"skill": qa.get("skill")})
        if task == "grounding":
            nameable = _uniquely_named(sample.info.get("objects", []))
            if nameable:
                name, obj = rng.choice(nameable)
                target = box_to_tokens(obj["box"], image_size, self.loc_bins)
                return TextExample("grounding", self.grounding_template.format(name=name), target, {"box": obj["box"]})
        if task == "contrastive":
            return TextExample("contrastive", "", sample.caption, negatives=self._negatives(sample, rng))
        return TextExample("caption", self.caption_prompt, sample.caption)

    def _negatives(self, sample: RawSample, rng: random.Random) -> list[str | None]:
        """``hard_negatives`` captions of the sample's swaps, padded with None when it has fewer."""
        pool = [neg["caption"] for neg in sample.info.get("hard_negatives", [])]
        drawn = rng.sample(pool, min(self.hard_negatives, len(pool))) if self.hard_negatives else []
        return drawn + [None] * (self.hard_negatives - len(drawn))


def _uniquely_named(objects: list[dict]) -> list[tuple[str, dict]]:
    """Objects with the shortest description that no other object in the scene shares."""
    named = []
    for describe in (lambda o: f"{o['color']} {o['shape']}", lambda o: f"{o['size']} {o['color']} {o['shape']}"):
        counts = Counter(describe(o) for o in objects)
        named += [(describe(o), o) for o in objects if counts[describe(o)] == 1 and not any(o is n for _, n in named)]
    return named
