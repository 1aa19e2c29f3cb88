"""Model soups (lightning_vlm/soup.py, the ``soup`` command) and EMA of the weights through Lightning's
EMAWeightAveraging: a soup of one checkpoint is that checkpoint, a uniform soup is the mean, a greedy soup never
scores below its best ingredient, other architectures are refused in one line; the EMA the callback keeps is the
weights a fit ends with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_vlm.cli import VLMCLI, load_model, main, read_recipe, run_cli
from lightning_vlm.soup import uniform_soup

from conftest import point_at

CLIP = Path(__file__).parents[1] / "recipes" / "clip.yaml"
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for these tiny models: on a busy machine a second OpenMP thread waiting at every small op made a
    validation of 64 samples take seconds instead of a fraction of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip(tiny_benchmark, tmp_path_factory) -> str:
    """recipes/clip.yaml, its encoders shrunk, on the tiny benchmark: 3 steps of 8 pairs without hard negatives,
    validated on one split (16 samples scored), in float32 (CPU bf16 autocast is slower), writing nothing."""
    recipe = read_recipe(CLIP)
    point_at(recipe, tiny_benchmark)
    folder = tmp_path_factory.mktemp("soup")
    recipe["trainer"].update(max_steps=STEPS, precision="32-true", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, callbacks=[],
                             default_root_dir=str(folder))
    recipe["model"]["init_args"].update(eval_max_samples=16, warmup_steps=1)
    parts = recipe["model"]["init_args"]["model"]["init_args"]
    parts["vision"]["init_args"]["overrides"].update(channels=[8, 16, 32, 64], stem_width=8, layers=[1, 1, 1, 1])
    parts["text"]["init_args"]["config"].update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64)
    recipe["data"]["init_args"].update(batch_size=8, eval_batch_size=16, num_workers=0, hard_negatives=0,
                                       val_splits=["val"], test_splits=["test"], shuffle_buffer=64)
    path = folder / "tiny_clip.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture(scope="module")
def ingredients(tiny_clip) -> list[str]:
    """Two checkpoints of the tiny recipe: one a fit wrote, and the same with every float weight perturbed."""
    first, second = (str(Path(tiny_clip).parent / name) for name in ("fit.ckpt", "perturbed.ckpt"))
    run_cli(["fit", "--config", tiny_clip]).trainer.save_checkpoint(first)
    saved = torch.load(first, map_location="cpu", weights_only=False)
    noise = torch.Generator().manual_seed(0)
    for key, value in saved["state_dict"].items():
        if value.is_floating_point():
            scale = 0.05 * value.std(correction=0)
            saved["state_dict"][key] = value + scale * torch.randn(value.shape, generator=noise)
    torch.save(saved, second)
    return [first, second]


def weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_a_soup_of_identical_checkpoints_is_that_checkpoint(ingredients, tmp_path):
    out = tmp_path / "same.ckpt"
    assert main(["soup", "--config", "unused.yaml", "--checkpoints", *[ingredients[0]] * 3, "--out", str(out)]) == 0
    soup, original = weights(str(out)), weights(ingredients[0])
    assert soup.keys() == original.keys()
    assert all(torch.equal(soup[key], original[key]) for key in original)


def test_a_uniform_soup_of_two_is_their_mean_and_loads(tiny_clip, ingredients, tmp_path):
    out = tmp_path / "mean.ckpt"
    assert main(["soup", "--config", tiny_clip, "--checkpoints", *ingredients, "--out", str(out)]) == 0
    first, second = (weights(path) for path in ingredients)
    model = load_model(tiny_clip, str(out)).state_dict()
    for key, value in first.items():
        expected = (value + second[key]) / 2 if value.is_floating_point() else value
        torch.testing.assert_close(model[key], expected, rtol=0, atol=0)
    assert not {"optimizer_states", "loops"} & torch.load(out, weights_only=False).keys()  # a resume refuses it
    assert run_cli(["validate", "--config", tiny_clip, "--ckpt_path", str(out)]).trainer.state.finished


def test_uniform_soup_takes_integer_buffers_from_the_first():
    first, second = {"w": torch.ones(2), "n": torch.tensor(3)}, {"w": torch.zeros(2), "n": torch.tensor(5)}
    soup = uniform_soup([first, second])
    assert torch.equal(soup["w"], torch.full((2,), 0.5)) and soup["n"] == 3


def test_a_greedy_soup_never_scores_below_its_best_ingredient(tiny_clip, ingredients, tmp_path, capsys):
    out = tmp_path / "greedy.ckpt"
    args = ["soup", "--config", tiny_clip, "--checkpoints", *ingredients, "--out", str(out), "--greedy"]
    assert main([*args, "--metric", "val/i2t_r1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    scores = [float(line.split(": ")[1]) for line in lines if line.startswith("ingredient ")]
    final = [line for line in lines if line.startswith("greedy soup of ")]
    assert len(scores) == 2 and len(final) == 1
    assert float(final[0].split()[-1]) >= max(scores)
    assert any(line.startswith(("add ", "skip ")) for line in lines)
    load_model(tiny_clip, str(out))

    assert main([*args, "--metric", "val/nothing"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "val/nothing" in error and "val/i2t_r1" in error


def test_other_architectures_and_missing_checkpoints_are_refused_in_one_line(ingredients, tmp_path, capsys):
    saved = torch.load(ingredients[0], map_location="cpu", weights_only=False)
    key = next(k for k, v in saved["state_dict"].items() if v.ndim == 2)
    saved["state_dict"][key] = saved["state_dict"][key][:, :-1]
    other = tmp_path / "other.ckpt"
    torch.save(saved, other)
    out = str(tmp_path / "never.ckpt")
    assert main(["soup", "--config", "unused.yaml", "--checkpoints", ingredients[0], str(other), "--out", out]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and key in error
    assert main(["soup", "--config", "unused.yaml", "--checkpoints", str(tmp_path / "none.ckpt"), "--out", out]) == 2
    assert "none.ckpt" in capsys.readouterr().err
    assert not Path(out).exists()


class WeightRecorder(Callback):
    """The raw weights after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()})


def test_ema_of_the_weights_from_the_command_line(tiny_clip):
    """README's form: the fit ends with the exponential moving average of its steps' weights (the first step's
    weights, then decay × average + (1 - decay) × each later step's), not its last step's."""
    recorder, decay = WeightRecorder(), 0.5
    ema = ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", f"--trainer.callbacks.decay={decay}"]
    cli = VLMCLI(args=["fit", "--config", tiny_clip, *ema], trainer_defaults={"callbacks": [recorder]})
    assert cli.trainer.global_step == STEPS and len(recorder.steps) == STEPS
    average = dict(recorder.steps[0])
    for step in recorder.steps[1:]:
        average = {key: decay * value + (1 - decay) * step[key] for key, value in average.items()}
    final = cli.model.state_dict()
    for key, value in average.items():
        torch.testing.assert_close(final[key], value)
    assert any(not torch.equal(final[key], value) for key, value in recorder.steps[-1].items())
