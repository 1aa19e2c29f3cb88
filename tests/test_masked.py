"""The masked family (FLAVA, MaskVLM): masking counts and positions, losses only at masked positions, the mask
token, conditioning, matching labels, overfitting one batch, and a fit that logs the suite and reconstructions."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_vlm.callbacks.sample_logger import SampleImageLogger
from lightning_vlm.data.collate import Collator
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.sources import ShardSource
from lightning_vlm.encoders import TextEncoder, VisionEncoder
from lightning_vlm.encoders.patches import patchify, unpatchify
from lightning_vlm.losses.masked import MaskedModelingLoss, masked_prediction_loss
from lightning_vlm.models.flava import FLAVA
from lightning_vlm.models.masked import MaskingConfig, PatchColourTokenizer
from lightning_vlm.models.masking import mask_tokens, pixel_targets, random_patch_mask
from lightning_vlm.models.maskvlm import MaskVLM
from lightning_vlm.paradigms.masked import MaskedPretraining

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 2, "embed_dim": 64, "num_heads": 2}
CAPTIONS = ["a small red circle.", "a large blue star left of a small green square.", "a small red circle.",
            "a tiny yellow diamond."]


def build(kind: str, tokenizer: str, **kwargs) -> FLAVA | MaskVLM:
    torch.manual_seed(0)
    vision = VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT, mask_token=True)
    text = TextEncoder(tokenizer=tokenizer, pooling="mean", config={"hidden_size": 64, "num_attention_heads": 2})
    if kind == "flava":
        return FLAVA(vision, text, embed_dim=32, num_heads=2, **kwargs)
    return MaskVLM(vision, text, embed_dim=32, num_heads=2, cross_depth=1, **kwargs)


def tokenize(model, captions=CAPTIONS):
    return Collator(model.text.tokenizer).tokenize(list(captions))


# ---- masking ---------------------------------------------------------------------------------------------------
def test_patch_mask_masks_exactly_the_ratio_in_every_row():
    mask = random_patch_mask(16, 64, 0.4, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.sum(dim=1).tolist() == [26] * 16  # round(0.4 * 64)
    assert len({tuple(row.tolist()) for row in mask}) == 16  # positions differ from image to image
    assert not random_patch_mask(4, 64, 0.0).any()
    with pytest.raises(ValueError, match="mask ratio"):
        random_patch_mask(4, 64, 1.0)


def test_text_masking_takes_the_fraction_of_real_tokens_and_labels_only_them(tiny_benchmark):
    tokenizer = TextEncoder(tokenizer=tiny_benchmark).tokenizer
    ids, attention = Collator(tokenizer).tokenize(CAPTIONS * 64)
    special = tokenizer.all_special_ids
    masked, labels = mask_tokens(ids, attention, special, tokenizer.mask_token_id, len(tokenizer), 0.15,
                                 generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    maskable = attention.bool() & ~torch.isin(ids, torch.tensor(special))
    expected = (maskable.sum(1) * 0.15).round().clamp_min(1)
    assert torch.equal(chosen.sum(1), expected.long())
    assert not (chosen & ~maskable).any()  # never padding, [CLS], [SEP]
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    replaced = (masked[chosen] == tokenizer.mask_token_id).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert 0.7 < replaced < 0.9 and 0.03 < kept < 0.2  # 80 % [MASK], 10 % kept (plus random hits), 10 % random


def test_patchify_follows_the_vit_patch_order_and_inverts():
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float).view(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch 4 is grid row 1, column 1: pixels 4..7 x 4..7, channel last
    assert torch.equal(patches[1, 4].view(4, 4, 3), images[1, :, 4:8, 4:8].permute(1, 2, 0))
    assert torch.equal(unpatchify(patches, 4, 8, 12), images)
    target = pixel_targets(torch.randn(2, 3, 8, 12), 4)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 6), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 6), atol=1e-3)


def test_colour_tokenizer_codes_each_patch_by_its_mean_colour():
    tokenizer = PatchColourTokenizer(patch_size=4, levels=4)
    image = torch.zeros(1, 3, 8, 8)  # normalised 0 = grey 0.5 -> level 2 on every channel
    image[0, 0, :4, :4] = 1.0  # top-left patch: red channel 1.0 -> level 3
    assert tokenizer(image).tolist() == [[3 * 16 + 2 * 4 + 2, 42, 42, 42]] and tokenizer.vocab_size == 64


# ---- losses ----------------------------------------------------------------------------------------------------
def test_masked_losses_count_only_masked_positions():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    reference = torch.stack([((pred[b, n] - target[b, n]) ** 2).mean() for b, n in mask.nonzero()]).mean()
    assert torch.allclose(masked_prediction_loss(pred, target, mask), reference)
    perfect_elsewhere = torch.where(mask.unsqueeze(-1), pred, target)  # reconstructing unmasked input: no change
    assert torch.allclose(masked_prediction_loss(perfect_elsewhere, target, mask), reference)
    codes = torch.randint(7, (2, 5))
    assert torch.allclose(masked_prediction_loss(pred, codes, mask), F.cross_entropy(pred[mask], codes[mask]))
    empty = masked_prediction_loss(pred.requires_grad_(), target, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_loss_weights_scale_terms_and_unknown_names_fail(tiny_benchmark):
    model = build("flava", tiny_benchmark)
    ids, attention = tokenize(model)
    torch.manual_seed(1)
    out = model(torch.randn(4, 3, 64, 64), ids, attention)
    plain = MaskedModelingLoss()(out)
    weighted = MaskedModelingLoss({"mim": 2.0, "itm": 0.0})(out)
    assert set(plain.terms) == {"itc", "mlm", "mim", "mmm_text", "mmm_image", "itm"}
    assert "itm" not in weighted.terms and torch.allclose(weighted.terms["mim"], 2 * plain.terms["mim"])
    assert torch.allclose(weighted.total, plain.total - plain.terms["itm"] + plain.terms["mim"])
    with pytest.raises(ValueError, match=r"unknown terms \['mmm'\].*'mmm_text'"):
        MaskedModelingLoss({"mmm": 1.0})


# ---- models ----------------------------------------------------------------------------------------------------
def test_mask_token_replaces_exactly_the_masked_patches(tiny_benchmark):
    vision = build("flava", tiny_benchmark).vision.eval()
    images = torch.randn(2, 3, 64, 64)
    none = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.equal(vision(images, none).tokens, vision(images).tokens)
    some = none.clone()
    some[0, 3] = True
    assert not torch.allclose(vision(images, some).tokens[0], vision(images).tokens[0])
    assert torch.equal(vision(images, some).tokens[1], vision(images).tokens[1])
    with pytest.raises(ValueError, match="mask_token=True"):
        VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT)(images, some)


def test_flava_matching_pairs_and_multimodal_masks(tiny_benchmark):
    model = build("flava", tiny_benchmark, itm_negative_fraction=0.5)
    ids, attention = tokenize(model, CAPTIONS * 4)
    torch.manual_seed(3)
    partner, matched = model.matching_partners(ids)
    assert (partner != torch.arange(16)).any() and not matched.all()
    assert torch.equal(matched, (ids[partner] == ids).all(1))  # rows 0 and 2 share a caption: a swap can match
    drawn = {}
    model.matching_partners = lambda input_ids: drawn.setdefault("pairs", FLAVA.matching_partners(model, input_ids))
    out = model(torch.randn(16, 3, 64, 64), ids, attention)
    labels = out.itm_labels.bool()
    assert torch.equal(labels, drawn["pairs"][1])
    mmm_text, mmm_image = out.predictions["mmm_text"], out.predictions["mmm_image"]
    assert not mmm_text.mask[~labels].any() and not mmm_image.mask[~labels].any()  # MMM on matched pairs only
    assert torch.equal(mmm_text.mask[labels], out.predictions["mlm"].mask[labels])
    assert out.predictions["mim"].mask.sum(1).tolist() == [6] * 16  # round(0.4 * 16 patches)


def test_maskvlm_reconstructs_each_modality_from_the_other(tiny_benchmark):
    model = build("maskvlm", tiny_benchmark).eval()
    both_ids, both_attention = tokenize(model, CAPTIONS + CAPTIONS[::-1])  # one padding length for both orders
    ids, attention = both_ids[:4], both_attention[:4]
    images = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    out = model(images, ids, attention)
    assert out.itm_labels.tolist() == [1] * 4 + [0] * 8
    torch.manual_seed(0)  # same masks, other captions: the image reconstruction changes
    changed_text = model(images, both_ids[4:], both_attention[4:])
    torch.manual_seed(0)  # same masks, other images: the text prediction changes
    changed_image = model(images.flip(0), ids, attention)
    mim, mlm = out.predictions["mim"], out.predictions["mlm"]
    assert not torch.allclose(changed_image.predictions["mlm"].pred[mlm.mask], mlm.pred[mlm.mask])
    assert not torch.allclose(changed_text.predictions["mim"].pred[mim.mask], mim.pred[mim.mask])


@pytest.mark.parametrize("kind", ["flava", "maskvlm"])
def test_every_parameter_gets_a_gradient(kind, tiny_benchmark):
    model = build(kind, tiny_benchmark)
    ids, attention = tokenize(model)
    MaskedModelingLoss()(model(torch.randn(4, 3, 64, 64), ids, attention)).total.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


@pytest.mark.parametrize("kind", ["flava", "maskvlm"])
def test_overfits_one_batch(kind, tiny_benchmark):
    model = build(kind, tiny_benchmark)
    loss_fn = MaskedModelingLoss()
    batch = next(iter(ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1}, batch_size=16).train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)  # as the contrastive overfit test
    history = []
    for _ in range(100):
        losses = loss_fn(model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.terms.items()})
    first, last = history[0], {k: sum(h[k] for h in history[-5:]) / 5 for k in history[0]}  # masks vary: average
    assert last["itc"] < 0.5 * first["itc"] and last["mlm"] < 0.6 * first["mlm"], (first, last)
    assert last["mim"] < 0.9 * first["mim"], (first, last)


@pytest.mark.parametrize("kind", ["flava", "maskvlm"])
def test_fit_logs_terms_the_suite_and_reconstructions(kind, tiny_benchmark, tmp_path):
    paradigm = MaskedPretraining(build(kind, tiny_benchmark), MaskedModelingLoss(), lr=1e-3, warmup_steps=1,
                                 eval_max_samples=64)
    dm = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1}, batch_size=16, val_splits=["val"])
    logger = TensorBoardLogger(tmp_path)
    trainer = L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, logger=logger,
                        callbacks=[SampleImageLogger(num_samples=4)], enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(paradigm, dm)
    metrics = trainer.callback_metrics
    assert {"train/mlm", "train/mim", "train/itm", "val/i2t_r5", "val/zeroshot_color",
            "val/binding_all", "val/mim_masked"} <= set(metrics)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {"samples", "reconstructions"} <= set(events.Tags()["images"])


def test_reconstruction_keeps_unmasked_patches(tiny_benchmark):
    model = build("flava", tiny_benchmark).eval()
    ids, attention = tokenize(model)
    images = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    masked, rebuilt = model.reconstruct(images, ids, attention)
    torch.manual_seed(0)
    patch_mask = model.masking.patch_mask(images)
    kept = ~patch_mask.unsqueeze(-1)
    assert torch.allclose(patchify(rebuilt, 16) * kept, patchify(images, 16) * kept, atol=1e-5)
    assert torch.equal(patchify(masked, 16)[patch_mask], torch.zeros(int(patch_mask.sum()), 16 * 16 * 3))
    assert not torch.allclose(patchify(rebuilt, 16)[patch_mask], patchify(images, 16)[patch_mask])


def test_an_image_tokenizer_makes_mim_a_classification_of_codes(tiny_benchmark):
    model = build("flava", tiny_benchmark, masking=MaskingConfig(image_tokenizer=PatchColourTokenizer(16)))
    ids, attention = tokenize(model)
    images = torch.randn(4, 3, 64, 64)
    out = model(images, ids, attention)
    mim = out.predictions["mim"]
    assert mim.target.dtype == torch.long and mim.pred.shape == (4, 16, 64)
    assert torch.equal(mim.target, PatchColourTokenizer(16)(images))
    assert torch.isfinite(MaskedModelingLoss()(out).terms["mim"])
    with pytest.raises(ValueError, match="pixel targets"):
        model.reconstruct(images, ids, attention)


def test_unimodal_batches_train_only_their_encoder(tiny_benchmark):
    model = build("flava", tiny_benchmark)
    ids, attention = tokenize(model)
    images = torch.randn(4, 3, 64, 64)
    image_only = MaskedModelingLoss({"itm": 0.5})(model(images, ids, attention, modality="image"))
    assert set(image_only.terms) == {"mim"}
    image_only.total.backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"vision", "mim_head"}
    model.zero_grad(set_to_none=True)
    text_only = MaskedModelingLoss()(model(images, ids, attention, modality="text"))
    assert set(text_only.terms) == {"mlm"}
    text_only.total.backward()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None} == {"text", "mlm_head"}
    with pytest.raises(ValueError, match="pairs"):
        build("maskvlm", tiny_benchmark)(images, ids, attention, modality="image")


def test_fit_mixes_unimodal_batches_with_pairs(tiny_benchmark, tmp_path):
    paradigm = MaskedPretraining(build("flava", tiny_benchmark), MaskedModelingLoss(), lr=1e-3, warmup_steps=1)
    seen = []
    output = paradigm.model_output
    paradigm.model_output = lambda batch: seen.append(batch["modality"]) or output(batch)
    sources = [ShardSource(tiny_benchmark, split="train"),  # the other splits stand in for unimodal data
               ShardSource(tiny_benchmark, split="val", modality="image"),
               ShardSource(tiny_benchmark, split="test", modality="text")]
    dm = ShardDataModule(root=tiny_benchmark, train=sources, tasks={"contrastive": 1}, batch_size=8,
                         samples_per_epoch=160)
    trainer = L.Trainer(max_steps=12, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(paradigm, dm)
    assert trainer.global_step == 12 and set(seen) == {"pair", "image", "text"}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
