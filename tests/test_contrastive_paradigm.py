"""Contrastive paradigms end to end on real batches: each overfits one batch, and validation runs the eval suite."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.encoders import TextEncoder, VisionEncoder
from lightning_vlm.losses.contrastive import CLIPLoss, LlipLoss, SigLIPLoss
from lightning_vlm.models.contrastive import DualEncoder, Llip
from lightning_vlm.paradigms.contrastive import Contrastive

STEPS = 120
TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 2, "embed_dim": 64, "num_heads": 2}


def build(kind: str, tokenizer: str) -> Contrastive:
    torch.manual_seed(0)
    vision = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=4 if kind == "llip" else 0, overrides=TINY_VIT)
    text = TextEncoder(tokenizer=tokenizer, pooling="mean")  # [CLS] pooling of a random BERT collapses at first
    if kind == "clip":
        model, loss = DualEncoder(vision, text, embed_dim=32), CLIPLoss()
    elif kind == "siglip":
        model = DualEncoder(vision, text, embed_dim=32, logit_scale_init=math.log(10), logit_bias_init=-10)
        loss = SigLIPLoss()
    else:
        model, loss = Llip(vision, text, embed_dim=32), LlipLoss()
    return Contrastive(model, loss, lr=1e-3, warmup_steps=1, eval_max_samples=64)


def chance_loss(kind: str, batch_size: int) -> float:
    """The loss of the collapsed solution (every pair scored alike, at the best constant): what learning must beat."""
    if kind == "clip":
        return math.log(batch_size)
    p = 1 / batch_size  # sigmoid losses: each image has one positive among batch_size pairs
    return -math.log(p) - (batch_size - 1) * math.log(1 - p)


def standardised(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels at zero mean and unit variance per channel over the batch.

    Under CLIP's statistics (the DataModule's default) the benchmark's dark backgrounds sit near -1.3 in every
    channel: a constant that swamps each patch embedding, so a random ViT pools every image to nearly one vector
    (1 - cos ~ 4e-3, against ~7e-2 standardised)."""
    return (pixels - pixels.mean(dim=(0, 2, 3), keepdim=True)) / pixels.std(dim=(0, 2, 3), keepdim=True)


@pytest.mark.parametrize("kind", ["clip", "siglip", "llip"])
def test_overfits_one_batch(kind, tiny_benchmark):
    paradigm = build(kind, tiny_benchmark)
    batch = next(iter(ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1}, batch_size=16).train_dataloader()))
    optimizer = torch.optim.AdamW(paradigm.parameters(), lr=3e-4)  # larger steps collapse both towers at first
    # SigLIP/Llip stalled before: near-identical image embeddings let the sigmoid's shared-shift gradient swamp Adam
    args = (standardised(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"])
    losses = []
    for _ in range(STEPS):
        loss = paradigm.loss(paradigm.model(*args)).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * chance_loss(kind, 16), losses[::10]


def test_fit_logs_losses_and_the_eval_suite_per_split(tiny_benchmark, tmp_path):
    paradigm = build("clip", tiny_benchmark)
    dm = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1}, batch_size=16,
                         val_splits=["val", "compositional"])
    trainer = L.Trainer(max_steps=4, val_check_interval=4, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(paradigm, dm)
    metrics = trainer.callback_metrics
    for split in ("val", "compositional"):
        assert {f"{split}/itc", f"{split}/i2t_r5", f"{split}/t2i_r1", f"{split}/zeroshot_color",
                f"{split}/binding_all"} <= set(metrics)
    assert 0.0 <= metrics["val/i2t_r5"] <= 1.0 and torch.isfinite(metrics["train/loss"])
    assert dm.tokenizer is paradigm.tokenizer  # the data side uses the tokenizer the model declares


def test_lr_multipliers_give_a_named_parameter_its_own_learning_rate(tiny_benchmark):
    paradigm = build("siglip", tiny_benchmark)
    paradigm.lr_multipliers = {"heads.logit_scale": 10.0, "heads.logit_bias": 10.0, "vision": 0.5}
    groups = {group["name"]: group for group in paradigm.parameter_groups()}
    heads = paradigm.model.heads
    assert groups["heads.logit_scale/no_decay"]["params"] == [heads.logit_scale]
    assert groups["heads.logit_bias/no_decay"]["params"] == [heads.logit_bias]
    assert groups["heads.logit_scale/no_decay"]["lr"] == pytest.approx(1e-2)
    assert groups["vision"]["lr"] == pytest.approx(5e-4)
    assert groups["base"]["lr"] == pytest.approx(1e-3)  # text tower and projections keep the base LR
    assert {id(p) for p in groups["base"]["params"]} == {id(p) for p in heads.parameters() if p.ndim == 2} | {
        id(p) for p in paradigm.model.text.parameters() if p.ndim >= 2}
    paradigm.lr_multipliers = {"heads.logit_sacle": 10.0}
    with pytest.raises(ValueError, match="logit_sacle"):
        paradigm.parameter_groups()


def test_the_siglip_recipe_trains_its_scale_and_bias_ten_times_faster(tiny_benchmark):
    from lightning_vlm.cli import load_model

    recipe = Path(__file__).parents[1] / "recipes" / "siglip.yaml"
    paradigm = load_model(str(recipe), None, "--data.init_args.root", tiny_benchmark,
                          "--model.init_args.model.init_args.text.init_args.tokenizer", tiny_benchmark)
    lrs = {group["name"]: group["lr"] for group in paradigm.parameter_groups()}
    assert lrs == {"base": pytest.approx(2e-3), "base/no_decay": pytest.approx(2e-3),
                   "heads.logit_scale/no_decay": pytest.approx(2e-2), "heads.logit_bias/no_decay": pytest.approx(2e-2)}
