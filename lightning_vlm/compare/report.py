"""The report of a comparison: ``results.csv`` (one row per entry x seed x metric), ``results.md`` (entries x
metrics grouped by the yardstick, mean ± std over seeds, the best per column in bold, the budget each spent, and
the average rank) and PNG figures (a bar chart per group; the headline metric against training FLOPs); with
`curve_points`, ``curves.csv`` and a ``curve_<metric>.png`` per metric over training (curves.py)."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from lightning_vlm.compare.config import Comparison, group_of
from lightning_vlm.compare.curves import write_curves

BUDGET = ["samples", "text_tokens", "steps", "trainable_params", "total_params", "train_flops", "wall_s",
          "peak_memory_mib"]
LOWER_IS_BETTER = {"loss"}


def blind_label(label: str) -> str:
    return f"{label} (blind)"


def collect(comparison: Comparison, out: Path, ledger: dict[str, dict]) -> list[dict]:
    """Rows (entry, seed, split, metric, group, value) of every done cell: its yardstick metrics (the test run's,
    the probe's) and its budget, and its blind control's metrics under the entry's blind label."""
    rows = []
    for entry in comparison.entries:
        for seed in comparison.seeds:
            cell = f"{entry.label}-seed{seed}"
            if ledger.get(cell, {}).get("status") != "done":
                continue
            for file, label in (("metrics.json", entry.label), ("probe.json", entry.label),
                                ("blind.json", blind_label(entry.label))):
                path = out / "cells" / cell / file
                metrics = json.loads(path.read_text()) if path.is_file() else {}
                for name, value in metrics.items():
                    split, _, metric = name.rpartition("/")
                    group = group_of(metric)
                    if split and group in comparison.yardstick + comparison.also:
                        rows.append({"entry": label, "seed": seed, "split": split, "metric": metric,
                                     "group": group, "value": value})
            budget_path = out / "tb" / entry.label / f"seed{seed}" / "budget.json"
            budget = json.loads(budget_path.read_text()) if budget_path.is_file() else {}
            for metric in BUDGET:
                if budget.get(metric) is not None:
                    rows.append({"entry": entry.label, "seed": seed, "split": "train", "metric": metric,
                                 "group": "budget", "value": float(budget[metric])})
    return rows


def write_report(comparison: Comparison, out: Path, ledger: dict[str, dict]) -> Path:
    rows = collect(comparison, out, ledger)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["entry", "seed", "split", "metric", "group", "value"])
        writer.writeheader()
        writer.writerows(rows)
    values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        values[(row["group"], f"{row['split']}/{row['metric']}")][row["entry"]].append(row["value"])
    entries = [entry.label for entry in comparison.entries]
    blind = {row["entry"] for row in rows} - set(entries)
    shown = [label for entry in entries for label in (entry, blind_label(entry)) if label == entry or label in blind]
    lines = [f"# Comparison `{comparison.name}`", "",
             f"{comparison.samples} training samples per entry, seeds {comparison.seeds}; mean ± std over seeds, "
             "the best per column in **bold**" + ("; a (blind) row scores its entry with every image zeroed, so what "
                                                 "it answers comes from the text alone" if blind else "") + ".", ""]
    for group in [*comparison.yardstick, *comparison.also, "budget"]:
        columns = sorted(column for g, column in values if g == group)
        if columns:
            lines += [f"## {group}", "", *_table(shown, columns, {c: values[(group, c)] for c in columns},
                                                best_of=entries if group != "budget" else []), ""]
    ranks = average_ranks(entries, {key: per_entry for key, per_entry in values.items()
                                    if key[0] in comparison.yardstick})
    lines += ["## Average rank (over the yardstick's columns, which every entry answers; 1 is best)", "",
              "| entry | rank |", "| --- | --- |",
              *[f"| {entry} | {rank:.2f} |" for entry, rank in sorted(ranks.items(), key=lambda item: item[1])], ""]
    report = out / "results.md"
    report.write_text("\n".join(lines))
    draw_figures(comparison, out, values, shown)
    if comparison.curve_points > 0:
        write_curves(comparison, out, ledger)
    return report


def average_ranks(entries: list[str], columns: dict[tuple[str, str], dict[str, list[float]]]) -> dict[str, float]:
    """Each entry's rank per column (by its mean; ties share the better rank), averaged over the columns it has."""
    ranks: dict[str, list[int]] = defaultdict(list)
    for (group, _), per_entry in columns.items():
        means = {entry: statistics.fmean(per_entry[entry]) for entry in entries if per_entry.get(entry)}
        sign = 1 if group in LOWER_IS_BETTER else -1
        for entry, mean in means.items():
            ranks[entry].append(1 + sum(sign * other < sign * mean for other in means.values()))
    return {entry: statistics.fmean(values) for entry, values in ranks.items()}


def _table(entries: list[str], columns: list[str], cells: dict[str, dict[str, list[float]]],
           best_of: list[str]) -> list[str]:
    """Entries x columns of mean ± std, the best of the `best_of` entries per column in bold."""
    lines = ["| entry | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    best = {}
    for column in columns:
        means = {e: statistics.fmean(v) for e, v in cells[column].items() if v and e in best_of}
        lower = column.rsplit("/", 1)[-1] in LOWER_IS_BETTER
        best[column] = (min if lower else max)(means.values()) if means else None
    for entry in entries:
        shown = []
        for column in columns:
            seen = cells[column].get(entry)
            if not seen:
                shown.append("—")
                continue
            mean = statistics.fmean(seen)
            text = _number(mean) + (f" ± {_number(statistics.stdev(seen))}" if len(seen) > 1 else "")
            shown.append(f"**{text}**" if entry in best_of and mean == best[column] else text)
        lines.append(f"| {entry} | " + " | ".join(shown) + " |")
    return lines


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"


def draw_figures(comparison: Comparison, out: Path, values: dict[tuple[str, str], dict[str, list[float]]],
                 entries: list[str]) -> None:
    """A bar chart per yardstick group (mean with the spread over seeds) of `entries` (blind rows included), and the
    headline metric against the training FLOPs each entry spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for group in comparison.yardstick + comparison.also:
        columns = sorted(column for g, column in values if g == group)
        if not columns:
            continue
        figure, axes = plt.subplots(figsize=(min(12.0, 2.0 + 1.1 * len(columns)), 3.8))
        width = 0.8 / len(entries)
        for index, entry in enumerate(entries):
            seen = [values[(group, c)].get(entry) or [float("nan")] for c in columns]
            means = [statistics.fmean(v) for v in seen]
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in seen]
            axes.bar([i + index * width for i in range(len(columns))], means, width, yerr=spread, label=entry)
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], columns, rotation=30, ha="right",
                        fontsize=7)
        axes.set_title(f"{comparison.name}: {group}")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / f"{group}.png", dpi=120)
        plt.close(figure)
    headline = comparison.headline
    flops = values.get(("budget", "train/train_flops"), {})
    if headline and flops:
        group = group_of(headline.rsplit("/", 1)[-1])
        scores = values.get((group, headline), {})
        figure, axes = plt.subplots(figsize=(4.5, 3.2))
        for entry in entries:
            if scores.get(entry) and flops.get(entry):
                axes.errorbar(statistics.fmean(flops[entry]), statistics.fmean(scores[entry]),
                              yerr=statistics.stdev(scores[entry]) if len(scores[entry]) > 1 else 0, fmt="o",
                              label=entry)
        spent = [value for entry in entries for value in flops.get(entry, [])]
        if max(spent) > 10 * min(spent):
            axes.set_xscale("log")
        else:
            axes.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        axes.set_xlabel("training FLOPs")
        axes.set_ylabel(headline)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "tradeoff.png", dpi=120)
        plt.close(figure)
