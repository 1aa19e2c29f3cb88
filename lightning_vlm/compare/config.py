"""A comparison config: entries (a recipe, its overrides, a label), the matched budget, the seeds and the yardstick
(metric groups), checked before anything trains."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# Metric groups of the yardstick, and how a logged metric's name (after its split) falls into one.
GROUPS = {
    "retrieval": re.compile(r"^(i2t|t2i)(_rerank)?_r\d+$"),
    "zero_shot": re.compile(r"^zeroshot_(color|shape)(_multi)?$"),
    "binding": re.compile(r"^binding_"),
    "vqa": re.compile(r"^vqa_"),
    "captioning": re.compile(r"^(cider_d|bleu4)$"),
    "grounding": re.compile(r"^grounding_"),
    "probe": re.compile(r"^probe_(color|shape|count|spatial|text|existence)$"),
    "loss": re.compile(r"^loss$"),
}
# The eval task a generative group needs in the entry's data (retrieval and zero-shot read every sample).
TASK_OF_GROUP = {"vqa": "vqa", "captioning": "caption", "grounding": "grounding"}


def group_of(metric: str) -> str | None:
    """The yardstick group of a metric name such as ``vqa_color`` (None for counts and diagnostics)."""
    return next((group for group, pattern in GROUPS.items() if pattern.match(metric)), None)


@dataclass
class Entry:
    """One row of the comparison: a recipe, dotted overrides into it, and the label it is reported under."""

    label: str
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    """Entries trained on `samples` training samples each (the matched budget; FLOPs, wall time and memory are
    reported), once per seed, and scored on the `yardstick`'s groups over the data's test splits: every entry must
    answer those; groups in `also` are reported for the entries that answer them. The ``probe`` group trains the
    frozen-feature probe (eval/probe.py) on `probe`'s images and epochs; `blind` adds, for each entry that writes
    text, a row scored with its images zeroed. `curve_points` > 0 validates each cell at that many evenly spaced steps
    while it trains, for curves of each metric against samples and FLOPs (curves.py)."""

    name: str
    entries: list[Entry]
    samples: int
    seeds: list[int] = field(default_factory=lambda: [0])
    yardstick: list[str] = field(default_factory=lambda: ["retrieval", "zero_shot", "vqa", "captioning"])
    also: list[str] = field(default_factory=list)
    headline: str | None = None
    eval_max_samples: int = 500
    probe: dict[str, int] = field(default_factory=lambda: {"images": 4000, "epochs": 20})
    blind: bool = True
    curve_points: int = 0
    root: Path = Path(".")

    def __post_init__(self) -> None:
        labels = [entry.label for entry in self.entries]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"comparison {self.name!r}: entry labels must differ, repeated: {duplicates}")
        unknown = sorted((set(self.yardstick) | set(self.also)) - set(GROUPS))
        if unknown:
            raise ValueError(f"comparison {self.name!r}: unknown metric group(s) {unknown}; known: {sorted(GROUPS)}")
        if self.curve_points < 0:
            raise ValueError(f"comparison {self.name!r}: curve_points must be 0 (no curves) or more")
        missing = [entry.recipe for entry in self.entries if not self.recipe_path(entry).is_file()]
        if missing:
            raise FileNotFoundError(f"comparison {self.name!r}: no recipe {missing} (relative to {self.root})")

    def recipe_path(self, entry: Entry) -> Path:
        return (self.root / entry.recipe).resolve()


def load_comparison(path: str | Path, samples: int | None = None, seeds: int | None = None) -> Comparison:
    """Read a comparison YAML (recipes relative to the working directory, as recipes name their data);
    `samples` and `seeds` (a count, seeds 0..K-1) override the file's. Top-level keys starting with ``x-`` only
    hold YAML anchors that entries share (as in compose files) and are dropped."""
    raw = {key: value for key, value in yaml.safe_load(Path(path).read_text()).items() if not key.startswith("x-")}
    unknown = set(raw) - {f.name for f in fields(Comparison)} - {"entries", "budget"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: "
                         f"{sorted({f.name for f in fields(Comparison)} - {'root', 'samples'} | {'budget'})}")
    entries = [Entry(**entry) for entry in raw.pop("entries")]
    budget = raw.pop("budget", {})
    unknown = set(budget) - {"samples"}
    if unknown:
        raise ValueError(f"{path}: the budget matches samples (budget: {{samples: N}}); got {sorted(unknown)}")
    raw.setdefault("name", Path(path).stem)
    if seeds is not None:
        raw["seeds"] = list(range(seeds))
    return Comparison(entries=entries, samples=samples or budget["samples"], **raw)
