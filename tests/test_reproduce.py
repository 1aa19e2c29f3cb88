"""The documented numbers' file and the reproduce benchmark: the tables are written from the file, every recipe it
lists starts from exactly the recipes it names, and every metric has a tolerance."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from lightning_vlm.cli import read_recipe

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe(entry: dict) -> dict:
    return read_recipe(ROOT / entry["command"].split("--config ")[1].split()[0])


def checkpoint_paths(config: dict) -> set[str]:
    """Where a recipe's ModelCheckpoint callbacks write last.ckpt."""
    return {f"{c['init_args']['dirpath']}/{c['init_args']['filename']}.ckpt"
            for c in config["trainer"].get("callbacks", []) if c["class_path"].endswith("ModelCheckpoint")}


def test_the_results_tables_are_written_from_the_reference_file(reproduce):
    assert reproduce.TABLES.read_text() == reproduce.tables(reproduce.load_reference()), (
        "docs/results/reference.md is stale: run python benchmarks/reproduce.py --write-docs")


def test_each_recipe_requires_exactly_the_recipes_whose_checkpoints_it_reads(reproduce):
    recipes = reproduce.load_reference()["recipes"]
    for name, entry in recipes.items():
        config = recipe(entry)
        reads = {source["path"] for source in config["model"]["init_args"].get("init_from", [])}
        written = set()
        for required in entry["requires"]:
            assert set(recipes[required]["writes"]) <= checkpoint_paths(recipe(recipes[required])), required
            written |= set(recipes[required]["writes"])
        assert reads == written, f"{name} reads {sorted(reads)}, its required recipes write {sorted(written)}"


def test_prerequisites_run_first_and_once(reproduce):
    recipes = reproduce.load_reference()["recipes"]
    assert reproduce.run_order(["flamingo", "blip2"], recipes) == ["clip", "llava", "flamingo", "blip2"]
    with pytest.raises(SystemExit, match="not in"):
        reproduce.run_order(["no_such_recipe"], recipes)
    cycle = {"a": {"requires": ["b"]}, "b": {"requires": ["a"]}}
    with pytest.raises(SystemExit, match="a -> b -> a"):
        reproduce.run_order(["a"], cycle)


def test_every_documented_metric_has_a_tolerance(reproduce):
    reference = reproduce.load_reference()
    for entry in reference["recipes"].values():
        for metric in entry["metrics"]:
            assert reproduce.tolerance(metric, reference["tolerances"]) > 0


def test_compare_flags_a_metric_outside_its_tolerance(reproduce, capsys):
    entry = {"metrics": {"val/vqa_color": 0.80, "val/cider_d": 5.0}}
    tolerances = {"vqa_*": 0.06, "cider_d": 0.5}
    assert reproduce.compare("x", entry, {"val/vqa_color": 0.85, "val/cider_d": 4.6}, tolerances)
    assert not reproduce.compare("x", entry, {"val/vqa_color": 0.70, "val/cider_d": 5.0}, tolerances)
    assert not reproduce.compare("x", entry, {"val/vqa_color": 0.80}, tolerances)
    assert "**outside**" in capsys.readouterr().out


def test_recipes_carry_no_measured_numbers():
    """Measured numbers go stale in a comment: they live in docs/results/reference.json."""
    pattern = re.compile(r"\b\d+:\d\d\b|\b0\.\d{3}\b|[Mm]easured")
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.partition("#")[2]
            assert not pattern.search(comment), f"{path.name}:{number} quotes a measurement: {line.strip()}"
