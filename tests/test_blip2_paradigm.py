"""BLIP-2 end to end on real batches: stage-2 labels, generation, overfitting one batch per stage, the staged
freezing plan inside one fit (frozen parts untouched, in eval mode, out of the optimizer; resume in phase),
LoRA through the plan, and initialisation from a checkpoint with its report."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_vlm.adapters import MLP, QFormer
from lightning_vlm.callbacks import Phase, StagedFreezing
from lightning_vlm.data.collate import Collator
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.losses import BLIP2Loss
from lightning_vlm.models.blip2 import BLIP2
from lightning_vlm.paradigms.blip2 import BLIP2Paradigm
from lightning_vlm.paradigms.weights import WeightsSource, load_weights

from conftest import paradigm_losses, text_loss

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY_CNN = {"norm_layer": "groupnorm1", "channels": [8, 16, 32, 64], "stem_width": 8, "layers": [1, 1, 1, 1]}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}


def build(tokenizer: str, instruction_aware: bool = False, loss_weights: dict | None = None,
          **kwargs) -> BLIP2Paradigm:
    torch.manual_seed(0)
    model = BLIP2(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                  lambda width: QFormer(width, config=TINY_BERT, tokenizer=tokenizer, num_queries=4),
                  LanguageModel(tokenizer=tokenizer, config=TINY_LM), embed_dim=16, projection=MLP(),
                  instruction_aware=instruction_aware)
    options = {"lr": 1e-3, "warmup_steps": 1, "eval_max_samples": 16, "rerank_k": 4, **kwargs}
    return BLIP2Paradigm(model, BLIP2Loss(loss_weights), **options)


def batch_of(paradigm: BLIP2Paradigm, root: str, tasks: dict, size: int = 8) -> dict:
    dm = ShardDataModule(root=root, tasks=tasks, batch_size=size)
    dm.trainer = type("T", (), {"lightning_module": paradigm, "global_rank": 0, "world_size": 1, "current_epoch": 0})()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_stage2_loss_is_cross_entropy_on_target_tokens_only(tiny_benchmark):
    paradigm = build(tiny_benchmark)
    batch = batch_of(paradigm, tiny_benchmark, {"vqa": 1.0}, size=4)
    model = paradigm.model
    loss = text_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                         batch["image_index"])
    prompt = model.visual_prompt(batch["pixel_values"])
    terms = []
    for b in range(4):  # the reference: the image's tokens spliced in where its placeholder stands, row by row
        ids, labels = batch["input_ids"][b][batch["attention_mask"][b].bool()], batch["labels"][b]
        at = int((ids == model.language_model.image_token_id).nonzero())
        embeds = torch.cat([model.language_model.embed(ids[:at]), prompt[b], model.language_model.embed(ids[at + 1:])])
        logits = model.language_model.model(inputs_embeds=embeds[None]).logits[0]
        q = prompt.shape[1]
        terms += [F.cross_entropy(logits[q - 1 + t - 1], labels[t])  # the position before a label predicts it
                  for t in range(at + 1, len(ids)) if labels[t] != -100]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    answers = [m["target"] for m in batch["meta"]]
    assert len(terms) == sum(len(paradigm.tokenizer.encode(a, add_special_tokens=False)) + 1 for a in answers)


def test_instruction_aware_queries_read_each_images_own_question(tiny_benchmark):
    """InstructBLIP: image i's visual prompt comes from the queries reading row i's question alone (its padding
    unseen), in training and in generation; BLIP-2's queries never read it."""
    paradigm = build(tiny_benchmark, instruction_aware=True)
    batch = batch_of(paradigm, tiny_benchmark, {"vqa": 1.0}, size=4)
    model, prompts = paradigm.model, [m["prompt"] for m in batch["meta"]]
    assert len({len(p.split()) for p in prompts}) > 1  # rows of different lengths: padding matters
    tokenize = Collator(paradigm.caption_tokenizer).tokenize
    features = model.image_features(batch["pixel_values"])
    alone = [model.qformer(features[i:i + 1], *tokenize([p]), mask="bidirectional").queries
             for i, p in enumerate(prompts)]
    with paradigm._instructed(prompts):
        instructed = model.visual_prompt(batch["pixel_values"])
    assert torch.allclose(instructed, model.lm_projection(torch.cat(alone)), atol=1e-5)
    with paradigm._instructed(prompts[::-1]):
        assert not torch.allclose(model.visual_prompt(batch["pixel_values"]), instructed, atol=1e-3)
    plain = build(tiny_benchmark)
    with plain._instructed(prompts[::-1]):
        assert torch.equal(plain.model.visual_prompt(batch["pixel_values"]),
                           plain.model.lm_projection(plain.model.queries(features)))
    with pytest.raises(ValueError, match="3 instructions for 4 images"), paradigm._instructed(prompts[:3]):
        model.visual_prompt(batch["pixel_values"])
    loss = paradigm_losses(paradigm, batch).total
    loss.backward()
    assert model.qformer.word_embeddings.weight.grad[tokenize(prompts)[0].unique()].abs().sum() > 0
    assert len(paradigm.eval().generate_text(batch["pixel_values"], prompts, max_new_tokens=3)) == 4


@pytest.mark.parametrize("generation", [{}, {"num_beams": 2}, {"do_sample": True, "top_p": 0.9}])
def test_generation_greedy_beam_and_nucleus_return_text(tiny_benchmark, generation):
    paradigm = build(tiny_benchmark).eval()
    batch = batch_of(paradigm, tiny_benchmark, {"vqa": 1.0}, size=3)
    texts = paradigm.generate_text(batch["pixel_values"], [m["prompt"] for m in batch["meta"]],
                                   max_new_tokens=4, **generation)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_left_padded_prompts_generate_as_if_alone(tiny_benchmark):
    """Padding is moved before the visual prompt: a short prompt batched with a long one continues identically."""
    paradigm = build(tiny_benchmark).eval()
    pixels = batch_of(paradigm, tiny_benchmark, {"vqa": 1.0}, size=2)["pixel_values"]
    prompts = ["what colour is the circle?", "how many objects are there in this picture?"]
    together = paradigm.generate_text(pixels, prompts, max_new_tokens=5)
    alone = [paradigm.generate_text(pixels[i:i + 1], prompts[i:i + 1], max_new_tokens=5)[0] for i in range(2)]
    assert together == alone


@pytest.mark.parametrize("weights", [{"itc": 1, "itm": 1, "itg": 1, "lm": 0}, {"itc": 0, "itm": 0, "itg": 0, "lm": 1}])
def test_overfits_one_batch_in_each_stage(tiny_benchmark, weights):
    paradigm = build(tiny_benchmark, loss_weights=weights)
    paradigm.model.vision.requires_grad_(False)
    batch = batch_of(paradigm, tiny_benchmark, {"caption": 1.0, "vqa": 1.0})
    optimizer = torch.optim.AdamW([p for p in paradigm.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for _ in range(100):
        losses = paradigm_losses(paradigm, batch)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        first = first if first is not None else {k: v.item() for k, v in losses.terms.items()}
    last = {k: v.item() for k, v in losses.terms.items()}
    assert set(last) == {k for k, w in weights.items() if w}
    # ITC over a frozen random ViT plateaus near 0.6 (of ln 8) on this batch; the generative terms fall further
    for term, ratio in (("itc", 0.45), ("itg", 0.3), ("lm", 0.3)):
        if term in last:
            assert last[term] < ratio * first[term], (term, first, last)


class Recorder(Callback):
    """What the optimizer and the modules look like at every training step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        model = pl_module.model
        self.steps.append({
            "groups": {g["name"] for g in trainer.optimizers[0].param_groups},
            "lm_in_optimizer": any(p is q for g in trainer.optimizers[0].param_groups for p in g["params"]
                                   for q in model.language_model.parameters()),
            "vision_training": model.vision.training, "lm_training": model.language_model.training,
            "weights": dict(pl_module.loss.weights), "lr": trainer.optimizers[0].param_groups[0]["lr"],
        })


PLAN = [Phase(start_step=0, freeze=["vision", "language_model", "lm_projection"],
              loss_weights={"itc": 1.0, "itm": 1.0, "itg": 1.0, "lm": 0.0}),
        Phase(start_step=3, unfreeze=["language_model", "lm_projection"], lr_multipliers={"language_model": 0.5},
              loss_weights={"itc": 0.0, "itm": 0.0, "itg": 0.0, "lm": 1.0})]


def fit(paradigm, root, tmp_path, steps, callbacks, ckpt_path=None) -> L.Trainer:
    dm = ShardDataModule(root=root, tasks={"caption": 1.0, "vqa": 1.0}, batch_size=8)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(paradigm, dm, ckpt_path=ckpt_path)
    return trainer


def test_staged_freezing_switches_stage_within_one_fit_and_resumes_in_phase(tiny_benchmark, tmp_path):
    paradigm = build(tiny_benchmark)
    vision_before = {k: v.clone() for k, v in paradigm.model.vision.state_dict().items()}
    lm_before = {k: v.clone() for k, v in paradigm.model.language_model.state_dict().items()}
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(paradigm, tiny_benchmark, tmp_path, 4, [StagedFreezing(PLAN), recorder, checkpoint])

    first, second = recorder.steps[:3], recorder.steps[3:]
    assert all(not s["lm_in_optimizer"] and not s["vision_training"] and not s["lm_training"] for s in first)
    assert all(s["weights"]["lm"] == 0.0 for s in first)
    assert second[0]["lm_in_optimizer"] and second[0]["lm_training"] and not second[0]["vision_training"]
    assert {"language_model", "language_model/no_decay"} <= second[0]["groups"]
    assert second[0]["weights"] == {"itc": 0.0, "itm": 0.0, "itg": 0.0, "lm": 1.0}
    assert all(torch.equal(vision_before[k], v) for k, v in paradigm.model.vision.state_dict().items())
    changed = [k for k, v in paradigm.model.language_model.state_dict().items() if not torch.equal(lm_before[k], v)]
    assert changed  # trained in the last step only

    resumed, recorder = build(tiny_benchmark), Recorder()
    fit(resumed, tiny_benchmark, tmp_path, 6, [StagedFreezing(PLAN), recorder], ckpt_path=str(tmp_path / "ckpt" /
                                                                                             "epoch=0-step=4.ckpt"))
    assert all(s["lm_in_optimizer"] and not s["vision_training"] and s["weights"]["lm"] == 1.0 for s in recorder.steps)
    assert len(recorder.steps) == 2


def test_lora_through_the_plan_trains_only_adapters(tiny_benchmark, tmp_path):
    paradigm = build(tiny_benchmark)
    base_before = {k: v.clone() for k, v in paradigm.model.language_model.state_dict().items()}
    plan = [PLAN[0], Phase(start_step=2, lora={"language_model": {"r": 4, "lora_alpha": 8}},
                           unfreeze=["lm_projection"], loss_weights={"itc": 0.0, "itm": 0.0, "itg": 0.0, "lm": 1.0})]
    trainer = fit(paradigm, tiny_benchmark, tmp_path, 4, [StagedFreezing(plan)])
    lm = paradigm.model.language_model
    adapters = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in adapters)
    state = lm.state_dict()
    assert all(torch.equal(base_before[k], state[k]) for k in base_before if k in state)  # base bit-identical
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in lm.named_parameters() if "lora_B" in n)

    trainer.save_checkpoint(tmp_path / "lora.ckpt")  # a predict (or test) run restores it, adapters and phase
    fresh = build(tiny_benchmark)
    L.Trainer(limit_predict_batches=1, logger=False, enable_progress_bar=False, callbacks=[StagedFreezing(plan)]
              ).predict(fresh, ShardDataModule(root=tiny_benchmark, batch_size=8), ckpt_path=tmp_path / "lora.ckpt")
    assert all(torch.equal(value, state[key]) for key, value in fresh.model.language_model.state_dict().items())


def test_a_frozen_bfloat16_lm_with_lora_trains_and_evaluates_under_bf16_autocast(tiny_benchmark, tmp_path):
    """The SmolLM2 recipes' setting: the LM's weights in bfloat16, LoRA and everything else float32, the steps under
    bf16 autocast; evaluation at the end (ITM re-ranking, generation) runs outside it on what the steps kept."""
    torch.manual_seed(0)
    cnn = VisionEncoder("resnet10t", overrides=TINY_CNN)  # its features come out of autocast in bf16 (a ViT's in fp32)
    model = BLIP2(cnn, lambda width: QFormer(width, config=TINY_BERT, tokenizer=tiny_benchmark, num_queries=4),
                  LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM, dtype="bfloat16"), embed_dim=16)
    paradigm = BLIP2Paradigm(model, lr=1e-3, warmup_steps=1, eval_max_samples=16, rerank_k=4)
    plan = [PLAN[0], Phase(start_step=2, lora={"language_model": {"r": 4}}, unfreeze=["lm_projection"],
                           loss_weights={"itc": 0.0, "itm": 0.0, "itg": 0.0, "lm": 1.0})]
    dm = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1.0, "vqa": 1.0}, batch_size=8, eval_batch_size=8)
    trainer = L.Trainer(max_steps=4, limit_val_batches=2, val_check_interval=4, precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[StagedFreezing(plan)])
    trainer.fit(paradigm, dm)
    lm = paradigm.model.language_model
    assert {p.dtype for n, p in lm.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in lm.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    metrics = trainer.callback_metrics
    assert {"val/i2t_rerank_r1", "val/vqa_all", "val/lm"} <= set(metrics) and torch.isfinite(metrics["val/lm"])


def test_init_from_reports_missing_and_unexpected_keys(tiny_benchmark, tmp_path):
    source = build(tiny_benchmark)
    torch.save({"state_dict": {**source.state_dict(), "model.vision.stray": torch.zeros(1)}}, tmp_path / "a.ckpt")
    target = build(tiny_benchmark)
    with torch.no_grad():
        target.model.vision.model.cls_token.add_(1.0)
    report = load_weights(target, WeightsSource(str(tmp_path / "a.ckpt"), prefix="model.vision.", into="model.vision"))
    assert report.unexpected == ["stray"] and report.missing == []
    assert torch.equal(target.model.vision.model.cls_token, source.model.vision.model.cls_token)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_weights(target, WeightsSource(str(tmp_path / "none.ckpt")))
    with pytest.raises(ValueError, match="starts with"):
        load_weights(target, WeightsSource(str(tmp_path / "a.ckpt"), prefix="nothing."))


def test_generate_from_pil_images_and_one_prompt(tiny_benchmark):
    from PIL import Image

    paradigm = build(tiny_benchmark).eval()
    images = [Image.new("RGB", (100, 80), "red"), Image.new("RGB", (64, 64), "blue")]
    answers = paradigm.generate(images, "what colour is the square?", max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert paradigm.preprocess(images).shape == (2, 3, 64, 64)


def test_plan_apply_puts_a_model_in_a_phase_outside_a_trainer(tiny_benchmark):
    paradigm = build(tiny_benchmark)
    StagedFreezing(PLAN).apply(paradigm)  # the last phase, as a fit reaching it would leave the model
    assert paradigm.loss.weights["lm"] == 1.0 and paradigm.loss.weights["itc"] == 0.0
    assert not any(p.requires_grad for p in paradigm.model.vision.parameters()) and not paradigm.model.vision.training
    assert all(p.requires_grad for p in paradigm.model.language_model.parameters())
    assert paradigm.lr_multipliers == {"language_model": 0.5}


@pytest.mark.parametrize("vision_norm", [True, False])
def test_the_queries_read_the_encoder_whatever_its_feature_scale(tiny_benchmark, vision_norm):
    """With ``vision_norm`` (BLIP-2's ln_vision) a frozen encoder whose tokens come out 8 times larger (its last
    GroupNorm's affine scaled: the same encoder otherwise) gives the Q-Former the same queries; without it, not."""
    torch.manual_seed(0)
    model = BLIP2(VisionEncoder("resnet10t", overrides=TINY_CNN),
                  lambda width: QFormer(width, config=TINY_BERT, tokenizer=tiny_benchmark, num_queries=4),
                  embed_dim=16, vision_norm=vision_norm).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens, before = model.vision(images).tokens, model.queries(model.image_features(images))
    last_block = model.vision.model.layer4[-1]
    with torch.no_grad():
        for norm in (last_block.bn2, last_block.downsample[-1]):  # the residual sum, so the block's output, x 8
            norm.weight.mul_(8.0), norm.bias.mul_(8.0)
    assert torch.allclose(model.vision(images).tokens, 8 * tokens, rtol=1e-4, atol=1e-5)
    after = model.queries(model.image_features(images))
    assert torch.allclose(after, before, atol=1e-4) == vision_norm


def test_keep_itc_override_keeps_the_contrastive_term_in_stage_two(tiny_benchmark):
    """recipes/blip2_tuning/keep_itc.yaml on top of blip2.yaml: stage 2 trains ITC beside the LM loss, into its own
    checkpoint folder; stage 1 and the stage boundary stay the recipe's."""
    from pathlib import Path

    from lightning_vlm.cli import VLMCLI

    from conftest import tokenizer_overrides

    recipes = Path(__file__).parents[1] / "recipes"
    data = ["--data.init_args.root", tiny_benchmark, *tokenizer_overrides(tiny_benchmark, recipes / "blip2.yaml")]
    configs = {}
    for name, extra in (("recipe", []), ("keep_itc", ["--config", str(recipes / "blip2_tuning" / "keep_itc.yaml")])):
        cli = VLMCLI(args=["--config", str(recipes / "blip2.yaml"), *extra, *data, "--model.init_args.init_from", "[]",
                           "--trainer.logger", "false"], run=False)
        plan = next(c for c in cli.trainer.callbacks if isinstance(c, StagedFreezing))
        checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
        plan.apply(cli.model)
        configs[name] = (plan.phases, Path(checkpoint.dirpath).name, cli.model.loss.weights)
    (recipe_phases, recipe_dir, recipe_weights), (phases, folder, weights) = configs["recipe"], configs["keep_itc"]
    assert recipe_weights["itc"] == 0.0 and weights["itc"] == 1.0 and weights["lm"] == recipe_weights["lm"] == 1.0
    assert phases[0] == recipe_phases[0] and phases[1].start_step == recipe_phases[1].start_step
    assert (recipe_dir, folder) == ("blip2", "blip2_keep_itc")
