"""`python -m lightning_vlm compare` end to end on a two-entry comparison at a tiny budget: every file written, a
rerun skips the cells already done, and a config that cannot be answered fails before anything trains."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_vlm.compare import compare_main
from lightning_vlm.compare.config import Comparison, Entry, load_comparison
from lightning_vlm.compare.report import write_report

RECIPES = Path(__file__).parents[1] / "recipes"
FAST = {"data.init_args.batch_size": 8, "data.init_args.num_workers": 0, "trainer.precision": "32-true"}


def comparison(workdir: Path, **changes) -> Path:
    config = {"name": "tiny", "budget": {"samples": 24}, "seeds": [0],
              "yardstick": ["retrieval", "zero_shot", "probe"], "headline": "test/i2t_r1", "eval_max_samples": 32,
              "probe": {"images": 32, "epochs": 1, "eval_images": 16},
              "entries": [{"label": "CLIP", "recipe": str(RECIPES / "clip.yaml"), "overrides": FAST},
                          {"label": "SigLIP", "recipe": str(RECIPES / "siglip.yaml"), "overrides": FAST}]}
    config.update(changes)
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def compare(workdir: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_vlm", "compare", "--config", str(config), "--out", "out"],
                          cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def workdir(tiny_benchmark, tmp_path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(tiny_benchmark)  # where the recipes read data and tokenizer
    return tmp_path


def test_compare_trains_scores_and_reports_every_entry_then_a_rerun_skips_them(workdir):
    result = compare(workdir, comparison(workdir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = workdir / "out"
    ledger = list(csv.DictReader((out / "ledger.csv").open()))
    assert [(row["cell"], row["status"]) for row in ledger] == [("CLIP-seed0", "done"), ("SigLIP-seed0", "done")]
    rows = list(csv.DictReader((out / "results.csv").open()))
    for entry in ("CLIP", "SigLIP"):
        mine = {(row["split"], row["metric"]): float(row["value"]) for row in rows if row["entry"] == entry}
        assert 0.0 <= mine[("test", "i2t_r1")] <= 1.0 and ("compositional", "zeroshot_color") in mine
        assert 0.0 <= mine[("compositional", "probe_count")] <= 1.0 and ("test", "probe_color") in mine
        assert mine[("train", "samples")] == 24 and mine[("train", "steps")] == 3
        assert mine[("train", "train_flops")] > 0 and mine[("train", "trainable_params")] > 0
    report = (out / "results.md").read_text()
    assert "## retrieval" in report and "## budget" in report and "Average rank" in report and "**" in report
    assert (out / "retrieval.png").stat().st_size and (out / "tradeoff.png").stat().st_size
    assert {p.name for p in (out / "tb").iterdir()} == {"CLIP", "SigLIP"}
    trained_at = (out / "cells" / "CLIP-seed0" / "final.ckpt").stat().st_mtime

    again = compare(workdir, comparison(workdir))
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("done before, skipped") == 2
    assert (out / "cells" / "CLIP-seed0" / "final.ckpt").stat().st_mtime == trained_at


@pytest.mark.parametrize("changes, message", [
    ({"yardstick": ["retrieval", "vqa"]}, "entry 'CLIP' .* cannot answer \\['vqa'\\]"),
    ({"yardstick": ["retrieval", "vibes"]}, "unknown metric group\\(s\\) \\['vibes'\\]"),
    ({"entries": [{"label": "X", "recipe": "recipes/nope.yaml"}]}, "no recipe \\['recipes/nope.yaml'\\]"),
    ({"colour": "blue", "x-anchor": {"a": 1}}, "unknown key\\(s\\) \\['colour'\\]; known: .*'yardstick'"),
])
def test_a_config_that_cannot_be_answered_fails_before_training_naming_why(workdir, changes, message, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(workdir)
    assert compare_main(["--config", str(comparison(workdir, **changes)), "--out", "out"]) == 2
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) == 1 and re.search(message, printed), printed
    assert not (workdir / "out" / "cells").exists()


def test_blind_rows_sit_under_their_entry_unranked_and_never_marked_best(tmp_path):
    entries = [Entry("llava", "recipes/llava.yaml"), Entry("clip", "recipes/clip.yaml")]
    comparison = Comparison("mixed", entries, samples=8, yardstick=["zero_shot"], also=["vqa"],
                            root=RECIPES.parent)
    cells = {"llava": ({"test/zeroshot_color": 0.5, "test/vqa_color": 0.4}, {"test/vqa_color": 0.9}),
             "clip": ({"test/zeroshot_color": 0.7}, None)}
    for label, (metrics, blind) in cells.items():
        cell = tmp_path / "cells" / f"{label}-seed0"
        cell.mkdir(parents=True)
        (cell / "metrics.json").write_text(json.dumps(metrics))
        if blind is not None:
            (cell / "blind.json").write_text(json.dumps(blind))
    report = write_report(comparison, tmp_path, {f"{e.label}-seed0": {"status": "done"} for e in entries})
    text = report.read_text()
    assert "| llava | **0.4** |\n| llava (blind) | 0.9 |\n| clip | — |" in text  # bold goes to a real entry
    ranks = text.split("Average rank")[1]
    assert "| clip | 1.00 |" in ranks and "| llava | 2.00 |" in ranks and "blind" not in ranks


def test_curve_points_validate_a_cell_at_evenly_spaced_steps_in_place_of_the_recipes_interval(tmp_path):
    from lightning_vlm.compare.cells import cell_config

    entry = Entry("clip", "recipes/clip.yaml")
    for points, expected in ((4, {"val_check_interval": 2, "check_val_every_n_epoch": None}),
                             (0, {"val_check_interval": 1250, "limit_val_batches": 0})):
        compared = Comparison("c", [entry], samples=128 * 10, curve_points=points, root=RECIPES.parent)
        trainer = cell_config(compared, entry, 0, tmp_path)["trainer"]
        assert trainer["max_steps"] == 10 and trainer["num_sanity_val_steps"] == 0
        assert {key: trainer[key] for key in expected} == expected
        assert "limit_val_batches" not in trainer or points == 0  # the recipe sets none: every val batch runs


def test_a_cell_seeds_both_the_initialisation_and_the_data_stream(tmp_path):
    """Seeds must vary what a fine-tune sees too: its weights all come from a checkpoint, so only the stream's order
    and augmentation can tell its seeds apart (the datamodule seeds them itself, apart from seed_everything)."""
    from lightning_vlm.compare.cells import cell_config

    entry = Entry("clip", "recipes/clip.yaml")
    compared = Comparison("c", [entry], samples=1280, seeds=[0, 3], root=RECIPES.parent)
    for seed in compared.seeds:
        config = cell_config(compared, entry, seed, tmp_path)
        assert config["seed_everything"] == seed and config["data"]["init_args"]["seed"] == seed


def test_curves_set_each_validation_against_samples_and_flops_with_a_band_over_seeds(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_vlm.compare.curves import read_curves, seed_band, write_curves

    values = {("A", 0): [0.1, 0.2, 0.3, 0.4], ("A", 1): [0.3, 0.2, 0.5, 0.4],
              ("B", 0): [0.5, 0.5, 0.5, 0.5], ("B", 1): [0.7, 0.7, 0.7, 0.7]}
    budgets = {"A": {"samples": 64, "steps": 8, "flops_per_step": 1000, "train_flops": 8000},
               "B": {"samples": 128, "steps": 8, "flops_per_step": None, "train_flops": 16000}}
    for (label, seed), curve in values.items():
        logs = tmp_path / "tb" / label / f"seed{seed}"
        with SummaryWriter(str(logs)) as fit:  # Lightning logs a validation after step k under step k - 1
            for step, value in zip((1, 3, 5, 7), curve):
                for tag, scalar in (("val/i2t_r1", value), ("compositional/i2t_r1", value / 2), ("train/loss", 9.0),
                                    ("val/zeroshot_color", 1 - value), ("budget/samples", 8.0 * step)):
                    fit.add_scalar(tag, scalar, step)
        with SummaryWriter(str(logs)) as test:  # the cell's test run logs into the same folder at step 0
            for tag in ("test/i2t_r1", "compositional/i2t_r1"):
                test.add_scalar(tag, 0.99, 0)
        (logs / "budget.json").write_text(json.dumps(budgets[label]))
        (logs / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": {
            "val_splits": ["val", "compositional"], "test_splits": ["test", "compositional"]}}}))
    compared = Comparison("curves", [Entry("A", "recipes/clip.yaml"), Entry("B", "recipes/clip.yaml")], samples=64,
                          seeds=[0, 1], yardstick=["retrieval"], also=["zero_shot"], headline="test/i2t_r1",
                          curve_points=4, root=RECIPES.parent)
    ledger = {f"{label}-seed{seed}": {"status": "done"} for label, seed in values}
    write_curves(compared, tmp_path, ledger)

    rows = list(csv.DictReader((tmp_path / "curves.csv").open()))
    assert {(row["split"], row["metric"]) for row in rows} == {
        ("val", "i2t_r1"), ("compositional", "i2t_r1"), ("val", "zeroshot_color")}  # no train or budget tags
    assert len(rows) == 4 * 3 * 4
    for row in rows:
        step, per_step = int(row["step"]), {"A": (8, 1000), "B": (16, 2000)}[row["entry"]]
        assert (float(row["samples"]), float(row["flops"])) == (step * per_step[0], step * per_step[1])
    curve_a = [row for row in read_curves(compared, tmp_path, ledger)
               if (row["entry"], row["split"], row["metric"]) == ("A", "val", "i2t_r1")]
    band = seed_band(curve_a, "samples")
    assert [point[0] for point in band] == [16, 32, 48, 64]
    assert [value for point in band for value in point[1:]] == pytest.approx(  # (mean, min, max) per step
        [0.2, 0.1, 0.3, 0.2, 0.2, 0.2, 0.4, 0.3, 0.5, 0.4, 0.4, 0.4])
    assert [point[0] for point in seed_band(curve_a, "flops")] == [2000, 4000, 6000, 8000]
    assert [path.name for path in tmp_path.glob("curve_*.png")] == ["curve_i2t_r1.png"]  # the headline's group only
    assert (tmp_path / "curve_i2t_r1.png").stat().st_size


@pytest.mark.parametrize("path", sorted((RECIPES.parent / "comparisons").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_comparison_loads_and_its_recipes_exist(path, monkeypatch):
    """Each comparisons/*.yaml reads (known keys, known groups, distinct labels) with its recipes found from the
    repository root, where its command runs; building each entry is left to compare's own check before training."""
    monkeypatch.chdir(RECIPES.parent)
    loaded = load_comparison(path)
    assert loaded.entries and all(loaded.recipe_path(entry).is_file() for entry in loaded.entries)
