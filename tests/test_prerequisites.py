"""A recipe brings its prerequisites: a missing checkpoint it starts from is trained first by the recipe its
``made_by`` names (or, with ``--prerequisites fail``, named in one line); expected mistakes end in one line and exit
status 2, not a traceback."""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_vlm.cli import main, read_recipe

from conftest import point_at

RECIPES = Path(__file__).parents[1] / "recipes"


def tiny_recipe(recipe: str, root: str, **trainer) -> dict:
    """A recipe on the tiny benchmark: batches of 8, no validation, no logger, fp32."""
    config = read_recipe(RECIPES / recipe)
    point_at(config, root)
    config["trainer"].update(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                             precision="32-true", enable_progress_bar=False, enable_model_summary=False, **trainer)
    config["data"]["init_args"].update(batch_size=8, eval_batch_size=8, num_workers=0)
    return config


def write(config: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def consumer(tmp_path: Path, root: str, made_by: str | None) -> str:
    """llava.yaml on the tiny benchmark, starting from an image encoder at ckpt/clip/last.ckpt (absent)."""
    config = tiny_recipe("llava.yaml", root)
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                      if "ModelCheckpoint" not in c["class_path"]]
    source = {"path": str(tmp_path / "ckpt" / "clip" / "last.ckpt"), "prefix": "model.vision.", "into": "model.vision"}
    config["model"]["init_args"]["init_from"] = [source | ({"made_by": made_by} if made_by else {})]
    return write(config, tmp_path / "llava_tiny.yaml")


def test_a_missing_checkpoint_is_trained_first_by_the_recipe_that_makes_it(tiny_benchmark, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    maker = tiny_recipe("clip.yaml", tiny_benchmark, val_check_interval=2)  # its checkpoint is saved on validation
    maker["trainer"]["limit_val_batches"] = 1
    maker["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt" / "clip")
    made_by = write(maker, tmp_path / "clip_tiny.yaml")
    assert main(["fit", "--config", consumer(tmp_path, tiny_benchmark, made_by)]) == 0
    out = capsys.readouterr().out
    assert f"last.ckpt is missing: training {made_by}, which makes it, first" in out and "done; going on" in out
    assert (tmp_path / "ckpt" / "clip" / "last.ckpt").is_file()


def test_with_prerequisites_fail_a_missing_checkpoint_is_named_with_its_command_in_one_line(tiny_benchmark, tmp_path,
                                                                                             capsys):
    config = consumer(tmp_path, tiny_benchmark, "recipes/clip.yaml")
    assert main(["fit", "--config", config, "--prerequisites", "fail"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err + captured.out
    assert "is missing; it is made by `python -m lightning_vlm fit --config recipes/clip.yaml`" in captured.err
    assert not (tmp_path / "ckpt").exists()


def test_a_missing_checkpoint_nothing_makes_ends_in_one_line(tiny_benchmark, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", consumer(tmp_path, tiny_benchmark, None)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: init_from: no checkpoint at ") and "init_from '[]'" in err


def test_a_split_the_data_lacks_ends_in_one_line(tiny_benchmark, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write(tiny_recipe("clip.yaml", tiny_benchmark), tmp_path / "clip_tiny.yaml")
    assert main(["test", "--config", config, "--data.init_args.test_splits", "[nope]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no split(s) ['nope']" in err


def test_a_missing_dataset_ends_in_one_line_naming_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(RECIPES / "clip.yaml"), "--data.init_args.root", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err == "error: no dataset at nowhere: generate one (python -m lightning_vlm data synth --out nowhere) or " \
                  "convert yours (python -m lightning_vlm data convert ...)\n"


def test_missing_prepared_weights_end_in_one_line_naming_the_command(tiny_benchmark, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_VLM_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tiny_recipe("llava_smollm2.yaml", tiny_benchmark)
    recipe["model"]["init_args"]["init_from"] = []  # else its made_by would train recipes/clip.yaml first
    config = write(recipe, tmp_path / "smol.yaml")
    assert main(["fit", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no prepared copy" in err and "python -m lightning_vlm weights prepare" in err
