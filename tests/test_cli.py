"""The command line: every recipe parses and runs a fast_dev_run, --print_config, unknown keys, data tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_vlm.cli import main, run_cli
from lightning_vlm.data import datamodule

from conftest import tokenizer_overrides

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
NEEDS_WEIGHTS = {"blip2_smollm2", "llava_smollm2"}  # the packaged checkpoints, prepared by a slow fixture


def tiny_overrides(root: str, recipe: Path) -> list[str]:
    """Point a recipe at the tiny benchmark (every tokenizer read from the default data too), start it from
    scratch rather than from a previous recipe's checkpoint, and make it a two-batch smoke run."""
    return ["--data.init_args.root", root, *tokenizer_overrides(root, recipe), "--model.init_args.init_from", "[]",
            "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8",
            "--data.init_args.num_workers", "0", "--trainer.fast_dev_run", "2",
            "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_prints_its_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_vlm." in printed and "trainer:" in printed


# The SmolLM2 recipes are left out: their golden-loss tests fit them through this CLI, and tests/test_smollm2.py
# trains and generates with them (a fast_dev_run of each took a minute of CI, mostly generating for validation).
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.stem not in NEEDS_WEIGHTS],
                         ids=[r.stem for r in RECIPES if r.stem not in NEEDS_WEIGHTS])
def test_recipe_fast_dev_run(recipe, tiny_benchmark, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(recipe), *tiny_overrides(tiny_benchmark, recipe)])
    assert cli.trainer.global_step == 2
    assert cli.trainer.state.finished


def test_without_a_logger_or_a_terminal_a_fit_prints_plain_progress_lines(tiny_benchmark, tmp_path, monkeypatch,
                                                                          capsys):
    """``--trainer.logger false`` trains (the callbacks that need a logger step aside), and with stdout not a
    terminal (as under pytest) progress comes as one line every log_every_n_steps steps, and one per validation."""
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES[0].parent / "clip.yaml"
    args = ["--data.init_args.root", tiny_benchmark, *tokenizer_overrides(tiny_benchmark, recipe),
            "--model.init_args.init_from", "[]", "--data.init_args.batch_size", "8", "--data.init_args.num_workers",
            "0", "--model.init_args.eval_max_samples", "16", "--trainer.max_steps", "4", "--trainer.log_every_n_steps",
            "2", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1", "--trainer.logger", "false"]
    cli = run_cli(["fit", "--config", str(recipe), *args])
    assert cli.trainer.global_step == 4 and cli.trainer.logger is None
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in progress] == ["step 2/4", "step 4/4"]
    assert all(" samples/s | loss " in line and " | ETA " in line for line in progress)
    (validation,) = [line for line in lines if line.startswith("validation at step 4: ")]
    assert "val/loss" in validation and "val/i2t_r1" in validation  # val's metrics before compositional's


def test_configs_compose_later_files_win(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  init_args:\n    batch_size: 7\ntrainer:\n  max_steps: 3\n")
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(RECIPES[0]), "--config", str(override), "--print_config"])
    printed = capsys.readouterr().out
    assert "batch_size: 7" in printed and "max_steps: 3" in printed


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_unknown_key_is_named_in_the_error(tmp_path, capsys, where):
    if where == "command line":
        extra = ["--data.init_args.bogus_knob", "3"]
    else:
        bad = tmp_path / "bad.yaml"
        bad.write_text("data:\n  init_args:\n    bogus_knob: 3\n")
        extra = ["--config", str(bad)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(RECIPES[0]), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bogus_knob" in err and err.count("\n") == 1 and err.startswith("error: ")  # one line, no usage block


def test_data_subcommands_dispatch(tiny_benchmark, capsys):
    assert main(["data", "inspect", tiny_benchmark, "--samples", "1"]) == 0
    assert "train" in capsys.readouterr().out


def test_missing_default_data_is_generated_first_and_said(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    made = []
    monkeypatch.setattr(datamodule, "generate_benchmark",
                        lambda root: made.append(Path(root)) or root.mkdir(parents=True))
    datamodule.ensure_default_benchmark("data/synthetic")
    assert made == [Path("data/synthetic.partial")] and Path("data/synthetic").is_dir()  # complete, then renamed
    assert "generating the synthetic benchmark" in capsys.readouterr().out
    datamodule.ensure_default_benchmark(tmp_path / "elsewhere")  # not the default place: never generated
    assert len(made) == 1


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_subcommands_run(subcommand, tiny_benchmark, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES[0]
    cli = run_cli([subcommand, "--config", str(recipe), *tiny_overrides(tiny_benchmark, recipe)])
    assert cli.trainer.state.finished


def test_other_ranks_wait_for_rank_zero_to_generate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(datamodule, "generate_benchmark", lambda root: pytest.fail("only rank 0 generates"))
    with pytest.raises(TimeoutError, match="rank 0"):
        datamodule.ensure_default_benchmark("data/synthetic", wait_s=0.5)


def test_load_model_builds_the_recipe_and_loads_a_checkpoint(tiny_benchmark, tmp_path):
    import torch
    from PIL import Image

    from lightning_vlm.cli import load_model

    recipe = Path(__file__).parents[1] / "recipes" / "blip2.yaml"
    tokenizers = tokenizer_overrides(tiny_benchmark, recipe)
    model = load_model(str(recipe), None, *tokenizers, "--data.init_args.root", tiny_benchmark)
    with torch.no_grad():
        model.model.logit_scale.fill_(1.234)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.ckpt")
    loaded = load_model(str(recipe), str(tmp_path / "m.ckpt"), *tokenizers, "--data.init_args.root", tiny_benchmark)
    assert loaded.model.logit_scale.item() == pytest.approx(1.234) and not loaded.training
    assert len(loaded.generate([Image.new("RGB", (64, 64), "red")], "what colour is it?", max_new_tokens=2)) == 1
