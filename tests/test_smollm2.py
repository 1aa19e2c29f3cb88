"""The real pretrained pipeline of recipes/blip2_smollm2.yaml and recipes/llava_smollm2.yaml, offline: one training
step per stage on two samples with the recipe's own plan, LoRA confined to its targets with the base LM
bit-identical, generation that returns text, and the retention probe on the real SmolLM2."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning import Callback
from PIL import Image

from lightning_vlm.callbacks import StagedFreezing
from lightning_vlm.cli import load_model
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.eval.retention import RetentionProbe, load_paragraphs, load_questions

pytestmark = pytest.mark.slow
RECIPES = Path(__file__).parents[1] / "recipes"


def recipe_plan(name: str, stage2_at: int) -> list[dict]:
    """The recipe's staged-freezing phases, its second phase moved to step `stage2_at`."""
    callbacks = yaml.safe_load((RECIPES / name).read_text())["trainer"]["callbacks"]
    phases = next(c["init_args"]["phases"] for c in callbacks if c["class_path"].endswith("StagedFreezing"))
    return [phases[0], {**phases[1], "start_step": stage2_at}]


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.terms: list[set[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert torch.isfinite(outputs["loss"])
        self.terms.append({k.split("/")[1] for k in trainer.callback_metrics if k.startswith("train/")})


@pytest.mark.parametrize("recipe", ["blip2_smollm2.yaml", "llava_smollm2.yaml"])
def test_recipe_trains_a_step_per_stage_on_two_samples_and_talks(recipe, tiny_benchmark, real_checkpoints, tmp_path):
    paradigm = load_model(str(RECIPES / recipe), None, "--data.init_args.root", tiny_benchmark).train()
    lm = paradigm.model.language_model
    base_before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[StagedFreezing(recipe_plan(recipe, stage2_at=1)), recorder])
    data = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1.0, "vqa": 3.0}, batch_size=2,
                           system_prompt="Answer in a few words.")
    trainer.fit(paradigm, data)
    assert len(recorder.terms) == 2 and "lm" in recorder.terms[1]

    trained = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trained)
    state = lm.model.state_dict()
    wrapped = {k: k if k in state else re.sub(r"\.(weight|bias)$", r".base_layer.\1", k) for k in base_before}
    assert sum(k != v for k, v in wrapped.items()) == 2 * 30  # q_proj and v_proj of SmolLM2's 30 layers wrapped
    assert all(torch.equal(base_before[k], state[wrapped[k]]) for k in base_before)  # the base LM is bit-identical
    assert all(p.grad is None for p in lm.parameters() if not p.requires_grad)  # frozen: no gradient buffers
    assert any(p.abs().sum() > 0 for n, p in lm.named_parameters() if "lora_B" in n)  # the adapters moved

    answers = paradigm.eval().generate([Image.new("RGB", (64, 64), "red")], "What colour is the square?",
                                       max_new_tokens=6)
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0]


def test_real_smollm2_knows_general_facts_and_reads_english(real_checkpoints):
    from lightning_vlm.encoders.lm import LanguageModel

    lm = LanguageModel("HuggingFaceTB/SmolLM2-135M-Instruct")
    metrics = RetentionProbe(load_questions()[:12], load_paragraphs()[:2]).run(lm)
    assert metrics["knowledge"] >= 0.5  # capitals and planets: what a 135M instruct model knows
    assert 1.0 < metrics["perplexity"] < 60.0


@pytest.mark.parametrize("override, lm_in_last_phase", [("llava_frozen.yaml", "frozen"), ("llava_full.yaml", "full")])
def test_lm_tuning_overrides_compose_with_the_recipe(override, lm_in_last_phase, tiny_benchmark, real_checkpoints):
    from lightning_vlm.cli import VLMCLI
    from lightning_vlm.eval.retention import LanguageRetention

    args = ["--config", str(RECIPES / "llava_smollm2.yaml"), "--config", str(RECIPES / "lm_tuning" / override),
            "--model.init_args.init_from", "[]", "--trainer.logger", "false", "--data.init_args.root", tiny_benchmark]
    cli = VLMCLI(args=args, run=False)
    plan = next(c for c in cli.trainer.callbacks if isinstance(c, StagedFreezing))
    assert any(isinstance(c, LanguageRetention) for c in cli.trainer.callbacks)
    plan.apply(cli.model)
    lm = cli.model.model.language_model
    trained = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert (trained == []) if lm_in_last_phase == "frozen" else (len(trained) == len(list(lm.parameters())))
    assert lm.dtype == (torch.bfloat16 if lm_in_last_phase == "frozen" else torch.float32)  # only float32 trains
    cli.model.parameter_groups()  # no half-precision parameter trains beside float32 ones
