"""``export`` writes a folder that `lightning_vlm.load_pretrained` loads without the recipe or the data, giving the
same outputs; a LoRA-tuned LM is written merged, in transformers' own format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForCausalLM

import lightning_vlm
from lightning_vlm.callbacks import StagedFreezing
from lightning_vlm.cli import load_model, main, read_recipe

from conftest import point_at

RECIPES = Path(__file__).parents[1] / "recipes"


def tiny_recipe(name: str, data: str, out: Path) -> Path:
    """recipes/NAME.yaml as one file reading its data and tokenizers from `data`, starting from scratch."""
    tree = read_recipe(RECIPES / f"{name}.yaml")
    point_at(tree, data)
    tree["model"]["init_args"]["init_from"] = []
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def export_command(recipe: Path, checkpoint: Path, out: Path) -> int:
    return main(["export", "--config", str(recipe), "--checkpoint", str(checkpoint), "--out", str(out)])


def save_checkpoint(paradigm, path: Path, **extra) -> Path:
    torch.save({"state_dict": paradigm.state_dict(), "global_step": 0, "epoch": 0, **extra}, path)
    return path


@pytest.fixture
def private_data(tiny_benchmark, tmp_path) -> Path:
    """A data folder holding only the benchmark's tokenizer, which a test may move away."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(Path(tiny_benchmark) / "tokenizer.json", data / "tokenizer.json")
    return data


def test_llava_with_lora_round_trips_and_its_merged_lm_loads_in_transformers(private_data, tmp_path):
    recipe = tiny_recipe("llava", str(private_data), tmp_path)
    paradigm = load_model(str(recipe))
    plan = StagedFreezing([{"start_step": 0, "lora": {"language_model": {"r": 4, "lora_alpha": 8}}}])
    plan.apply(paradigm)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in paradigm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # adapters that change the LM's function, so merging them matters
    paradigm.eval()
    checkpoint = save_checkpoint(paradigm, tmp_path / "last.ckpt", callbacks={"StagedFreezing": plan.state_dict()})
    assert export_command(recipe, checkpoint, tmp_path / "out") == 0
    reloaded = load_model(str(recipe), str(checkpoint)).state_dict()  # the plan's LoRA comes back before the weights
    assert reloaded.keys() == paradigm.state_dict().keys()
    assert all(torch.equal(value, reloaded[key]) for key, value in paradigm.state_dict().items())

    private_data.rename(tmp_path / "moved")  # nothing may read the data folder any more
    ids = torch.randint(0, 50, (2, 7))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "language_model")
    with torch.no_grad():
        expected = paradigm.model.language_model.model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)

    loaded = lightning_vlm.load_pretrained(tmp_path / "out")
    assert not loaded.training
    images = [Image.new("RGB", (64, 64), "red"), Image.effect_noise((64, 64), 40).convert("RGB")]
    pixels = paradigm.preprocess(images)
    tokens = [model.model.generate(pixels, *collated(model), max_new_tokens=6) for model in (paradigm, loaded)]
    assert torch.equal(tokens[0], tokens[1])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Budget\n\nnot recorded" in card and "lightning_vlm.load_pretrained" in card
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["model"]["init_args"]["model"]["init_args"]["language_model"]["init_args"]["lora"] is None


def collated(paradigm) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids and mask of one question, as the paradigm lays out generation prompts."""
    from lightning_vlm.data.collate import Collator
    from lightning_vlm.data.tasks import TextExample

    ids, mask = Collator(paradigm.tokenizer, image_token=paradigm.image_token).generation_inputs(
        [TextExample("vqa", "What colour is the circle?", "")] * 2
    )
    return ids, mask


def test_clip_round_trips_to_equal_embeddings(private_data, tmp_path):
    recipe = tiny_recipe("clip", str(private_data), tmp_path)
    paradigm = load_model(str(recipe))
    checkpoint = save_checkpoint(paradigm, tmp_path / "last.ckpt")
    assert export_command(recipe, checkpoint, tmp_path / "out") == 0
    private_data.rename(tmp_path / "moved")

    loaded = lightning_vlm.load_pretrained(tmp_path / "out")
    pixels = torch.randn(3, 3, 64, 64)
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_images(pixels), paradigm.model.encode_images(pixels))
        assert torch.equal(loaded.model.encode_texts(ids, mask), paradigm.model.encode_texts(ids, mask))
    assert loaded.tokenizer("a red circle")["input_ids"] == paradigm.tokenizer("a red circle")["input_ids"]


def test_export_of_a_missing_checkpoint_fails_in_one_line(tmp_path, capsys):
    recipe = str(RECIPES / "clip.yaml")
    assert main(["export", "--config", recipe, "--checkpoint", str(tmp_path / "none.ckpt"), "--out", "x"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.ckpt not found" in err and "--checkpoint" in err


def test_the_model_card_reports_the_runs_metrics_and_budget(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_vlm.export import model_card

    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    with SummaryWriter(run) as writer:
        writer.add_scalar("val/loss", 1.5, 3)
        writer.add_scalar("train/loss", 9.0, 3)
    (run / "budget.json").write_text(json.dumps({"samples": 24, "steps": 3}))
    config = {
        "model": {"class_path": "P", "init_args": {"model": {"class_path": "a.M"}}},
        "data": {"class_path": "D", "init_args": {"root": "data/x"}},
    }
    card = model_card(config, "r.yaml", "c.ckpt", {"global_step": 3, "epoch": 0}, tmp_path / "runs")
    assert "| val/loss | 1.5 |" in card and "train/loss" not in card and "| samples | 24 |" in card
    assert "root: data/x" in card
    assert card.count("not recorded") == 0
    assert model_card(config, "r.yaml", "c.ckpt", {"global_step": 4}, tmp_path / "runs").count("not recorded") == 2
