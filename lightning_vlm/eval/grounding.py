"""Grounding accuracy: a generated box (four location tokens, as the grounding task writes them) counts as found
when its IoU with the true box is at least 0.5. Both boxes are read back from their tokens, so both carry the
same binning; a cell-inclusive box [x0, y0, x1 + 1, y1 + 1] in bin units keeps a one-bin box non-empty."""

from __future__ import annotations

import re
from collections.abc import Sequence

LOCATION = re.compile(r"<loc_(\d+)>")


def tokens_to_box(text: str) -> tuple[int, int, int, int] | None:
    """The first four location tokens of `text` as a box in bins, or None when there are fewer than four or the
    corners are out of order."""
    bins = [int(b) for b in LOCATION.findall(text)[:4]]
    if len(bins) < 4 or bins[2] < bins[0] or bins[3] < bins[1]:
        return None
    x0, y0, x1, y1 = bins
    return x0, y0, x1 + 1, y1 + 1


def box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def grounding_accuracy(generated: Sequence[str], targets: Sequence[str], threshold: float = 0.5) -> float:
    """The share of generated boxes with IoU >= `threshold` against their target's box; unreadable ones miss."""
    hits = 0
    for text, target in zip(generated, targets, strict=True):
        box, true = tokens_to_box(text), tokens_to_box(target)
        hits += box is not None and true is not None and box_iou(box, true) >= threshold
    return hits / len(targets) if targets else 0.0
