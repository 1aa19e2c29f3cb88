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
from lightning_vlm.compare.config import Comparison, Entry
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
