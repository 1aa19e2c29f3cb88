"""Zero-shot classification for a model that writes text instead of embedding it: each image's candidate captions
scored by their log-likelihood given the image, so a generative entry answers the same zero-shot question as a
contrastive one (eval/suite.py's `zero_shot_task`: the images whose objects share one colour or one shape).

The candidates of an image are its own caption with that colour (or shape) replaced by each class, in every object
phrase ("a small red circle left of a large red star." -> "... blue ... blue ..."), so the classes differ in
nothing else. A contrastive model's zero-shot scores the benchmark's templates instead ("a {size} {}
{shape}."): one text encoding serves every image there, while a likelihood costs a forward pass per image and
candidate, so templates would multiply the cost by their number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_vlm.distributed import gather_objects
from lightning_vlm.eval.suite import zero_shot_task

PHRASE = re.compile(r"\ba (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+)\b")  # OBJECT_PHRASE, data/synthetic/language.py
Score = Callable[[Tensor, Sequence[Sequence[str]]], Tensor]


def substituted(caption: str, attribute: str, value: str) -> str:
    """`caption` with `attribute` set to `value` in every object phrase."""
    def swap(match: re.Match) -> str:
        slots = match.groupdict() | {attribute: value}
        return f"a {slots['size']} {slots['color']} {slots['shape']}"

    return PHRASE.sub(swap, caption)


class LikelihoodZeroShot:
    """Zero-shot colour and shape accuracy by caption likelihood (see the module docstring); `score(pixel_values,
    captions)` gives each image's log-likelihood of each of its (N, C) candidates. An `Evaluator`."""

    groups = ("zero_shot",)

    def __init__(self, score: Score, max_samples: int | None = 200) -> None:
        self.score = score
        self.max_samples = max_samples
        self.reset()

    def reset(self) -> None:
        self.pixels: list[Tensor] = []
        self.metas: list[dict[str, Any]] = []

    @property
    def full(self) -> bool:
        return self.max_samples is not None and len(self.metas) >= self.max_samples

    def update(self, model: Any, batch: dict[str, Any]) -> None:
        room = len(batch["meta"]) if self.max_samples is None else self.max_samples - len(self.metas)
        if room > 0:
            self.pixels.append(batch["pixel_values"][:room].cpu())
            self.metas.extend(batch["meta"][:room])

    @torch.no_grad()
    def compute(self, model: Any, split: str) -> dict[str, float]:
        """Scored over every rank's samples (gathered), so every rank logs the same metrics."""
        parts = gather_objects((self.pixels, self.metas))
        if parts is not None:
            self.pixels = [pixels for part_pixels, _ in parts for pixels in part_pixels]
            self.metas = [meta for _, part_metas in parts for meta in part_metas]
        metrics: dict[str, float] = {}
        if not self.metas:
            return metrics
        pixels = torch.cat(self.pixels)
        for attribute in ("color", "shape"):
            task = zero_shot_task(self.metas, attribute)
            if task is None:
                continue
            captions = [[substituted(self.metas[row]["caption"], attribute, name) for name in task.classes]
                        for row in task.rows]
            scores = self.score(pixels[task.rows], captions)
            metrics.update(task.metrics(scores.argmax(dim=1)))
        return {f"{split}/{name}": value for name, value in metrics.items()}
