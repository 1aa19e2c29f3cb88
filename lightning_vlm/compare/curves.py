"""Metric curves of a comparison trained with `curve_points`: every yardstick metric its cells logged while
validating, read from their TensorBoard events and set against the samples and the training FLOPs spent by then
(``curves.csv``), and a figure per metric with the mean over seeds as a line and their min-max as a band."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from lightning_vlm.compare.config import Comparison, group_of

FIELDS = ["entry", "seed", "step", "samples", "flops", "split", "metric", "value"]
FIGURE_SPLIT = "val"  # the split the figures show; curves.csv keeps every validated split


def read_curves(comparison: Comparison, out: Path, ledger: dict[str, dict]) -> list[dict]:
    """Rows (entry, seed, step, samples, flops, split, metric, value) of every done cell's metrics in the yardstick
    and `also` groups as its fit validated them; its budget.json turns steps into samples and FLOPs."""
    groups = set(comparison.yardstick + comparison.also)
    rows = []
    for entry in comparison.entries:
        for seed in comparison.seeds:
            logs = out / "tb" / entry.label / f"seed{seed}"
            if ledger.get(f"{entry.label}-seed{seed}", {}).get("status") != "done" \
                    or not (logs / "budget.json").is_file():
                continue
            budget = json.loads((logs / "budget.json").read_text())
            samples_per_step = budget["samples"] / budget["steps"]
            flops_per_step = budget.get("flops_per_step") or (
                budget["train_flops"] / budget["steps"] if budget.get("train_flops") else float("nan"))
            for (split, metric), by_step in validated(logs).items():
                if group_of(metric) in groups:
                    rows += [{"entry": entry.label, "seed": seed, "step": step, "samples": step * samples_per_step,
                              "flops": step * flops_per_step, "split": split, "metric": metric, "value": value}
                             for step, value in sorted(by_step.items())]
    return rows


def validated(logs: Path) -> dict[tuple[str, str], dict[int, float]]:
    """A cell's validation scalars, {(split, metric): {steps trained: value}}, from the events of its fit runs (a
    resume adds a file; where steps repeat the later run wins). Its test runs log into the same folder, under the
    config's test splits only, and are left out. Lightning logs a validation under the steps taken before the
    batch that triggered it, hence the +1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = yaml.safe_load((logs / "config.yaml").read_text())["data"]["init_args"]  # LightningCLI's, resolved
    val_splits, test_splits = set(data["val_splits"]), set(data["test_splits"])
    scalars: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for path in sorted(logs.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        tags = [tag.rpartition("/") for tag in events.Tags()["scalars"]]
        if all(split in test_splits for split, _, _ in tags if split):
            continue
        for split, _, metric in tags:
            if split in val_splits:
                scalars[(split, metric)].update({event.step + 1: event.value
                                                 for event in events.Scalars(f"{split}/{metric}")})
    return scalars


def seed_band(rows: list[dict], x: str) -> list[tuple[float, float, float, float]]:
    """One entry's rows of one split and metric as points (x, mean, min, max) over its seeds, one per step in order;
    `x` is the column plotted along (``samples`` or ``flops``), averaged over the seeds too."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        by_step[row["step"]].append(row)
    return [(statistics.fmean(row[x] for row in seen), statistics.fmean(row["value"] for row in seen),
             min(row["value"] for row in seen), max(row["value"] for row in seen))
            for _, seen in sorted(by_step.items())]


def write_curves(comparison: Comparison, out: Path, ledger: dict[str, dict]) -> None:
    """``curves.csv``, and ``curve_<metric>.png`` for each metric of the headline's group (of every yardstick group
    when there is no headline) on the `FIGURE_SPLIT`: against samples seen and against training FLOPs."""
    rows = read_curves(comparison, out, ledger)
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [group_of(comparison.headline.rsplit("/", 1)[-1])] if comparison.headline else comparison.yardstick
    per_metric: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["split"] == FIGURE_SPLIT and group_of(row["metric"]) in shown:
            per_metric[row["metric"]].append(row)
    for metric, mine in sorted(per_metric.items()):
        draw_curve(comparison, f"{FIGURE_SPLIT}/{metric}", mine, out / f"curve_{metric}.png")


def draw_curve(comparison: Comparison, name: str, rows: list[dict], path: Path) -> None:
    """One metric's `rows` in two panels, against samples and against FLOPs: per entry its seed_band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True)
    for axes, x, label in ((panels[0], "samples", "training samples seen"), (panels[1], "flops", "training FLOPs")):
        for entry in comparison.entries:
            points = seed_band([row for row in rows if row["entry"] == entry.label], x)
            if not points:
                continue
            xs, means, lows, highs = zip(*points)
            (line,) = axes.plot(xs, means, marker=".", label=entry.label)
            axes.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        axes.set_xlabel(label)
        axes.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    panels[0].set_ylabel(name)
    panels[1].legend(fontsize=7)
    figure.suptitle(f"{comparison.name}: {name} (mean over seeds, band min to max)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
