"""Learning smoke tests: each family, and the chain from CLIP into BLIP-2 and LLaVA, trained for a short budget on a
small benchmark must clear a floor that a model which does not learn stays far below (retrieval at chance, the
majority answer). They run the recipes themselves, shortened, so a change that stops a paradigm or a chain from
learning fails CI instead of a user's afternoon. Slow: CI runs them once.
"""

from __future__ import annotations

import collections
import glob
import json
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from lightning_vlm.cli import read_recipe, run_cli

from conftest import point_at

RECIPES = Path(__file__).parents[1] / "recipes"
SIZES = {"train": 4096, "val": 200}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """A 4,096-sample training split (each sample seen about once in these budgets) and 200 val samples."""
    from lightning_vlm.data.synthetic import generate_benchmark

    root = tmp_path_factory.mktemp("learning") / "synthetic"
    generate_benchmark(root, sizes=SIZES, seed=0, samples_per_shard=512, num_workers=0)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Where the recipes write their checkpoints (checkpoints/clip/last.ckpt, ...), shared so a chain can follow."""
    return tmp_path_factory.mktemp("runs")


def shortened(recipe: str, root: Path, steps: int, batch_size: int, stage_two: int | None = None, **model) -> dict:
    """The recipe's YAML for the small benchmark: `steps` steps of `batch_size`, one validation at the end on val
    alone, a staged plan's later phase starting at `stage_two`, and `model` init_args overridden."""
    config = read_recipe(RECIPES / recipe)
    config["trainer"].update(max_steps=steps, val_check_interval=steps, enable_progress_bar=False)
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"].endswith("StagedFreezing"):
            callback["init_args"]["phases"][1]["start_step"] = stage_two
    config["data"]["init_args"].update(root=str(root), batch_size=batch_size, eval_batch_size=100, num_workers=0,
                                      val_splits=["val"], test_splits=["val"])
    config["model"]["init_args"].update(eval_max_samples=SIZES["val"], **model)
    point_at(config, str(root))  # the data root and every tokenizer the recipe reads from the default data
    return config



def fit(config: dict, workdir: Path, monkeypatch) -> dict[str, float]:
    """Train the configuration in `workdir`; its last validation metrics."""
    monkeypatch.chdir(workdir)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_cli(["fit", "--config", str(path)])
    return {name: float(value) for name, value in cli.trainer.callback_metrics.items()}


def majority_answer_rate(root: Path, skill: str) -> float:
    """How often the most common answer to the val split's questions of one skill is right."""
    answers = collections.Counter(
        qa["answer"] for sample in wds.WebDataset(sorted(glob.glob(str(root / "val" / "*.tar"))), shardshuffle=False)
        for qa in json.loads(sample["json"])["qa"] if qa["skill"] == skill)
    return answers.most_common(1)[0][1] / sum(answers.values())


@pytest.fixture(scope="module")
def clip_run(benchmark, workdir) -> dict[str, float]:
    """A short `clip.yaml` in `workdir` (its checkpoint is what the chained recipes start from); its val metrics."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return fit(shortened("clip.yaml", benchmark, steps=300, batch_size=64), workdir, monkeypatch)


def test_clip_learns_and_its_encoder_feeds_the_chain(clip_run, workdir):
    chance = 5 / SIZES["val"]
    assert clip_run["val/i2t_r5"] > 0.6 > 10 * chance
    assert clip_run["val/zeroshot_color"] > 0.8
    assert (workdir / "checkpoints" / "clip" / "last.ckpt").is_file()


def test_flava_learns(benchmark, tmp_path, monkeypatch):
    metrics = fit(shortened("flava.yaml", benchmark, steps=150, batch_size=64), tmp_path, monkeypatch)
    assert metrics["val/i2t_r5"] > 0.5 > 10 * 5 / SIZES["val"]


@pytest.mark.parametrize("recipe", ["blip2.yaml", "llava.yaml"])
def test_chained_recipe_learns_to_answer_from_the_clip_encoder(recipe, clip_run, benchmark, workdir, monkeypatch):
    """The short CLIP's frozen encoder, then 100 steps of the recipe's first stage and 500 of its second: the
    colour answers are far above the majority answer."""
    config = shortened(recipe, benchmark, steps=600, batch_size=64, stage_two=100)
    metrics = fit(config, workdir, monkeypatch)
    assert metrics["val/vqa_color"] > majority_answer_rate(benchmark, "color") + 0.2
