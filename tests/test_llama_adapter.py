"""LLaMA-Adapter: zero gates leave the LM bit-identical, one prompt is read as its gated value by every token, an LM
it cannot read fails at once, the fusion plans train only prompts, gates and projection, an opened gate lets the image
change the output, generation reads the prompts as training does, and the comparison's entries pass its checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_vlm.callbacks import StagedFreezing
from lightning_vlm.compare.config import load_comparison
from lightning_vlm.compare.run import check_entries
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.losses import next_token_loss
from lightning_vlm.models.llama_adapter import LLaMAAdapter, prompt_attention
from lightning_vlm.paradigms.generative import ImageToText

REPO = Path(__file__).parents[1]
FUSION = REPO / "comparisons" / "fusion.yaml"
TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}


def build(tokenizer: str) -> LLaMAAdapter:
    torch.manual_seed(0)
    return LLaMAAdapter(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                        LanguageModel(tokenizer=tokenizer, config=TINY_LM), num_prompts=4)


def text(model: LLaMAAdapter, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = model.language_model.tokenizer
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    return encoded.input_ids, encoded.attention_mask


def logits(output) -> torch.Tensor:
    return output.head(output.hidden)


def open_gates(model: LLaMAAdapter, value: float = 1.0) -> None:
    model.adaption.gates.data.fill_(value)


def test_zero_gates_leave_the_language_models_logits_bit_identical(tiny_benchmark):
    model = build(tiny_benchmark).eval()
    ids, mask = text(model, ["what colour is the square?", "how many?"])
    lm = model.language_model
    alone = logits(lm(lm.embed(ids), mask, ids))
    assert torch.equal(logits(model(torch.randn(2, 3, 64, 64), ids, mask, ids)), alone)


def test_one_prompt_is_read_by_every_token_as_its_value_scaled_by_its_heads_gate(tiny_benchmark):
    """A softmax over a single prompt is 1 whatever the query: each head h adds gate[h] times the prompt's value
    (its key/value head under grouped-query attention), then the output projection."""
    model = build(tiny_benchmark)
    attention = model.language_model.model.get_decoder().layers[0].self_attn
    hidden, prompt, gate = torch.randn(2, 5, 32), torch.randn(2, 1, 32), torch.tensor([0.5, -2.0])
    rotary = model.language_model.model.get_decoder().rotary_emb
    positions = rotary(hidden, torch.arange(5)[None].expand(2, -1))
    read = prompt_attention(attention, hidden, positions, prompt, gate)
    value = attention.v_proj(prompt)  # (2, 1, head_dim): one key/value head serves both heads
    expected = attention.o_proj(torch.cat([gate[0] * value, gate[1] * value], dim=-1)).expand(-1, 5, -1)
    torch.testing.assert_close(read, expected)


def test_an_lm_it_cannot_read_fails_at_construction_naming_why(tiny_benchmark):
    with pytest.raises(ValueError, match="without grad_checkpointing"):
        LLaMAAdapter(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                     LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM, grad_checkpointing=True))
    with pytest.raises(ValueError, match="between 1 and the LM's 2 layers"):
        LLaMAAdapter(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                     LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM), num_layers=3)


def fusion_plan(label: str) -> StagedFreezing:
    """The staged-freezing plan of a comparisons/fusion.yaml entry."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the comparison names its recipes from the checkout's root
        entry = next(e for e in load_comparison(FUSION).entries if e.label == label)
    assert entry.overrides["model.init_args.model.class_path"] == "lightning_vlm.models.llama_adapter.LLaMAAdapter"
    (callback,) = entry.overrides["trainer.callbacks"]
    return StagedFreezing(**callback["init_args"])


@pytest.mark.parametrize("label, lora", [("llama-adapter-frozen", False), ("llama-adapter-lora", True)])
def test_the_fusion_plans_train_prompts_gates_and_projection_and_the_lm_gets_no_gradient(tiny_benchmark, label,
                                                                                          lora):
    model = build(tiny_benchmark)
    fusion_plan(label).apply(ImageToText(model))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapter_parts = {"adaption.prompts", "adaption.gates"} | {f"projector.{n}" for n, _ in
                                                                model.projector.named_parameters()}
    assert {name for name in trainable if "lora_" not in name} == adapter_parts
    assert any("lora_" in name for name in trainable) == lora
    ids, mask = text(model, ["a red square above a blue circle", "two circles"])
    images = torch.randn(2, 3, 64, 64)
    next_token_loss(model(images, ids, mask, ids)).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable  # nothing reaches the frozen LM's or image encoder's weights
    moved = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved - {name for name in moved if "lora_B" in name} == {"adaption.gates"}  # zero gates: only they move

    model.zero_grad()
    open_gates(model, 0.5)
    next_token_loss(model(images, ids, mask, ids)).backward()
    moved = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert adapter_parts <= moved


def test_an_open_gate_lets_the_image_change_the_output(tiny_benchmark):
    model = build(tiny_benchmark).eval()
    ids, mask = text(model, ["what colour is the square?", "how many?"])
    lm = model.language_model
    alone = logits(lm(lm.embed(ids), mask, ids))
    open_gates(model)
    images = torch.randn(2, 3, 64, 64)
    read = logits(model(images, ids, mask, ids))
    assert not torch.allclose(read, alone)
    assert not torch.allclose(logits(model(images.flip(0), ids, mask, ids)), read)


def test_generation_reads_the_prompts_and_the_image_as_the_forward_does(tiny_benchmark):
    model = build(tiny_benchmark).eval()
    ids, mask = text(model, ["what colour is the square?"] * 2)
    images = torch.randn(2, 3, 64, 64)
    lm = model.language_model
    assert torch.equal(model.generate(images, ids, mask, max_new_tokens=4),
                       lm.generate(lm.embed(ids), mask, max_new_tokens=4))  # zero gates: the LM's own answer

    open_gates(model)
    scores = {}
    for name, pixels in (("image", images), ("other", images.flip(0))):
        out = model.generate(pixels, ids, mask, max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
        scores[name] = torch.stack(out.scores, dim=1)  # (B, 4, V), decoding steps after the first read the KV cache
        read = torch.cat([ids, out.sequences[:, :-1]], dim=1)
        forward = logits(model(pixels, read, torch.ones_like(read), read))[:, ids.shape[1] - 1:]
        torch.testing.assert_close(scores[name], forward)  # every step reads the prompts as the training forward does
    assert not torch.allclose(scores["image"], scores["other"])
    assert model.generate(images, ids, mask, max_new_tokens=4, num_beams=2).shape[0] == 2
    assert model.adaption._image is None  # the image is released after decoding


def test_the_fusion_entries_pass_the_comparisons_checks(tiny_benchmark, tmp_path, monkeypatch):
    """As `python -m lightning_vlm compare` checks them before training (from a checkout whose data is tiny)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(tiny_benchmark)  # where the recipe reads data and tokenizer
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    comparison = load_comparison(FUSION)
    mine = [entry for entry in comparison.entries if entry.label.startswith("llama-adapter")]
    answers = check_entries(comparison, tmp_path / "out", mine)
    assert set(answers) == {"llama-adapter-frozen", "llama-adapter-lora"}
    assert all(set(comparison.yardstick) <= groups for groups in answers.values())
