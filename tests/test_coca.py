"""CoCa: the [CLS] embedding comes from the unimodal layers alone, captioning reads the image, both losses train,
and a short fit logs retrieval and generation metrics."""

from __future__ import annotations

import lightning as L
import torch

from lightning_vlm.adapters import AttentionPooler
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.coca import CoCa
from lightning_vlm.paradigms.coca import CoCaParadigm

from conftest import paradigm_losses, text_loss

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
           "num_key_value_heads": 1}


def build(tokenizer: str) -> CoCa:
    torch.manual_seed(0)
    return CoCa(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                LanguageModel(tokenizer=tokenizer, config=TINY_LM), embed_dim=16,
                caption_pooler=AttentionPooler(num_queries=4, num_heads=2), num_heads=2)


def batch_of(paradigm, root: str, tasks=None) -> dict:
    dm = ShardDataModule(root=root, tasks=tasks or {"caption": 1, "vqa": 1}, batch_size=8)
    dm.trainer = type("T", (), {"lightning_module": paradigm, "global_rank": 0, "world_size": 1, "current_epoch": 0})()
    return next(iter(dm.train_dataloader()))


def test_text_embedding_ignores_the_multimodal_layers_and_captions_read_the_image(tiny_benchmark):
    model = build(tiny_benchmark).eval()
    paradigm = CoCaParadigm(model)
    batch = batch_of(paradigm, tiny_benchmark)
    ids, mask = batch["caption_input_ids"], batch["caption_attention_mask"]
    before = model.encode_texts(ids, mask)
    with torch.no_grad():
        for layer in model.language_model.model.get_decoder().layers[model.unimodal_layers:]:
            for p in layer.parameters():
                p.add_(torch.randn_like(p))  # change only the multimodal layers
    assert torch.allclose(model.encode_texts(ids, mask), before)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    flipped = (batch["pixel_values"].flip(0), *args[1:])
    assert not torch.allclose(text_loss(model, *args), text_loss(model, *flipped))


def test_both_losses_train_every_part(tiny_benchmark):
    model = build(tiny_benchmark)
    paradigm = CoCaParadigm(model)
    losses = paradigm_losses(paradigm, batch_of(paradigm, tiny_benchmark))
    assert set(losses.terms) == {"itc", "caption"}
    losses.total.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_coca_overfits_one_batch(tiny_benchmark):
    model = build(tiny_benchmark)
    paradigm = CoCaParadigm(model)
    batch = batch_of(paradigm, tiny_benchmark, {"caption": 1})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first, last = paradigm_losses(paradigm, batch).terms, []
    for _ in range(120):
        losses = paradigm_losses(paradigm, batch)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        last = [*last[-9:], {k: v.item() for k, v in losses.terms.items()}]
    late = {k: sum(step[k] for step in last) / len(last) for k in first}  # ITC on 8 pairs is noisy: average
    assert late["caption"] < 0.7 * first["caption"] and late["itc"] < 0.5 * first["itc"], (first, late)


def test_fit_logs_retrieval_and_generation(tiny_benchmark, tmp_path):
    paradigm = CoCaParadigm(build(tiny_benchmark), eval_max_samples=16, warmup_steps=1,
                            generation={"max_new_tokens": 4})
    dm = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1, "vqa": 1}, batch_size=8, val_splits=["val"])
    trainer = L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(paradigm, dm)
    assert {"val/i2t_r5", "val/zeroshot_color", "val/cider_d", "val/vqa_all", "train/itc", "train/caption"} <= set(
        trainer.callback_metrics)
