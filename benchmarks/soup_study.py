"""Model soups against their ingredients, and EMA against none: comparisons/soups.yaml's cells, then the uniform and
the greedy soup (on val/i2t_r1) of each entry's seeds, each scored by the same test run as a compare cell.

    python benchmarks/soup_study.py [--config comparisons/soups.yaml] [--out runs/compare/soups] [--entries finetune]

Prints a markdown table (mean and spread over seeds for the ingredients, one number for a soup) and writes it to
OUT/soups.md. Reruns skip the cells and soups already scored.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from lightning_vlm.compare.cells import cell_name, test_cell, write_config
from lightning_vlm.compare.config import load_comparison

COLUMNS = ("test/i2t_r1", "test/t2i_r1", "test/zeroshot_color", "test/zeroshot_shape", "test/binding_all",
           "compositional/i2t_r1", "style_shift/i2t_r1", "style_shift/zeroshot_color")


def run(args: list[str]) -> None:
    """``python -m lightning_vlm ARGS``, failing loudly."""
    subprocess.run([sys.executable, "-m", "lightning_vlm", *args], check=True)


def soup_cell(ingredients: list[Path], config: dict, cell: Path, greedy: bool) -> dict[str, float]:
    """The soup of `ingredients` written as `cell`/final.ckpt and scored by the ingredients' test run."""
    if not (cell / "metrics.json").is_file():
        scored = copy.deepcopy(config)
        for callback in scored["trainer"]["callbacks"]:
            if callback["class_path"].endswith(".MetricsWriter"):
                callback["init_args"]["path"] = str(cell / "metrics.json")
        config_path = write_config(scored, cell)
        ranking = ["--greedy", "--metric", "val/i2t_r1"] if greedy else []
        run(["soup", "--config", str(config_path), "--checkpoints", *map(str, ingredients),
             "--out", str(cell / "final.ckpt"), *ranking])
        test_cell(config_path, cell)
    return json.loads((cell / "metrics.json").read_text())


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="comparisons/soups.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/compare/soups"))
    parser.add_argument("--entries", nargs="+", default=["finetune", "finetune-ema", "scratch"],
                        help="the entries souped")
    args = parser.parse_args()
    run(["compare", "--config", args.config, "--out", str(args.out)])
    comparison = load_comparison(args.config)
    rows: list[tuple[str, list[dict[str, float]]]] = []
    for entry in comparison.entries:
        cells = [args.out / "cells" / cell_name(entry, seed) for seed in comparison.seeds]
        rows.append((f"{entry.label} (each seed)", [json.loads((c / "metrics.json").read_text()) for c in cells]))
        if entry.label in args.entries:
            config = yaml.safe_load((cells[0] / "config.yaml").read_text())
            ingredients = [c / "final.ckpt" for c in cells]
            for kind in ("uniform", "greedy"):
                cell = args.out / "soups" / f"{entry.label}-{kind}"
                metrics = soup_cell(ingredients, config, cell, kind == "greedy")
                chosen = torch.load(cell / "final.ckpt", map_location="cpu", weights_only=False)["soup"]
                rows.append((f"{entry.label}: {kind} soup of {len(chosen)}", [metrics]))
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for label, results in rows:
        lines.append(f"| {label} | " + " | ".join(summary([r[c] for r in results if c in r]) for c in COLUMNS) + " |")
    table = "\n".join(lines)
    (args.out / "soups.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
