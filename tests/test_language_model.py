"""LanguageModel: LoRA trains only its adapters, and a half-precision frozen LM computes what the float32 one does
while the parts around it (and its adapters) stay float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.losses import NextTokenLoss, shift_labels
from lightning_vlm.paradigms.base import VLMParadigm

from conftest import text_loss

TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}


def _lm(tokenizer: str, **kwargs) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(tokenizer=tokenizer, config=TINY_LM, **kwargs)


def _inputs(lm: LanguageModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 6, lm.width, generator=generator, requires_grad=True)  # float32, like visual tokens
    labels = torch.randint(0, len(lm.tokenizer), (2, 6), generator=generator)
    labels[:, :3] = -100
    return embeds, torch.ones(2, 6, dtype=torch.long), labels


def test_lora_trains_only_the_adapters_and_leaves_the_base_bit_identical(tiny_benchmark):
    lm = _lm(tiny_benchmark)
    added = lm.add_lora(r=4, lora_alpha=8)
    trainable = {name for name, p in lm.model.named_parameters() if p.requires_grad}
    assert trainable == set(added) and added and all("lora_" in name for name in added)
    assert all(".q_proj." in name or ".v_proj." in name for name in added)
    base = {name: p.detach().clone() for name, p in lm.model.named_parameters() if not p.requires_grad}
    embeds, mask, labels = _inputs(lm)
    optimizer = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # lora_B starts at zero: the second step moves lora_A too
        text_loss(lm, embeds, mask, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, base[name]) for name, p in lm.model.named_parameters() if name in base)
    assert all(not torch.equal(p, torch.zeros_like(p)) for name, p in lm.model.named_parameters() if "lora_B" in name)


def test_half_precision_lm_matches_float32_keeps_float32_adapters_and_passes_gradients(tiny_benchmark):
    full = _lm(tiny_benchmark)
    half = _lm(tiny_benchmark, dtype="bfloat16", attn_implementation="eager")
    half.load_state_dict(full.state_dict())
    assert half.dtype == torch.bfloat16 and half.model.config._attn_implementation == "eager"
    embeds, mask, labels = _inputs(full)
    reference = text_loss(full, embeds, mask, labels)
    loss = text_loss(half, embeds, mask, labels)
    assert loss.dtype == torch.float32 and torch.allclose(loss, reference, rtol=2e-2)
    loss.backward()
    assert embeds.grad is not None and embeds.grad.dtype == torch.float32 and embeds.grad.abs().sum() > 0

    adapters = half.add_lora(r=4)
    assert {half.model.get_parameter(name).dtype for name in adapters} == {torch.float32}
    assert torch.allclose(text_loss(half, embeds, mask, labels), reference, rtol=2e-2)  # LoRA starts as the identity
    new = half.generate(embeds[:, :3].detach(), mask[:, :3], max_new_tokens=2)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 2


def test_loss_reductions_weigh_tokens_or_samples_as_the_reference_says(tiny_benchmark):
    """"token" is transformers' own loss; "sample" averages each row's labelled tokens, then the rows that have
    any (a row without labels does not count): the one-token answer weighs as much as the five-token caption."""
    lm = _lm(tiny_benchmark)
    embeds, mask, labels = _inputs(lm)
    labels = torch.cat([labels, labels[:1]])
    labels[0, 1:5], labels[1, 1:5], labels[2] = -100, 7, -100  # rows: 1 label, 5 labels, none
    embeds, mask = torch.cat([embeds, embeds[:1]]), torch.cat([mask, mask[:1]])
    transformers_out = lm.model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    per_token = nn.functional.cross_entropy(transformers_out.logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                            reduction="none")
    labelled = labels[:, 1:] != -100
    assert torch.allclose(NextTokenLoss()(lm(embeds, mask, labels)).total, transformers_out.loss)
    assert torch.allclose(NextTokenLoss()(lm(embeds, mask, labels)).total, per_token[labelled].mean())
    row_means = [per_token[row][labelled[row]].mean() for row in range(2)]
    by_sample = NextTokenLoss(reduction="sample")(lm(embeds, mask, labels)).terms["lm"]
    assert torch.allclose(by_sample, torch.stack(row_means).mean())
    with pytest.raises(ValueError, match="reduction"):
        NextTokenLoss(reduction="batch")


def test_the_label_shift_pairs_each_position_with_the_next_token():
    labels = torch.tensor([[5, -100, 7, 8], [-100, -100, 3, -100]])
    targets, keep = shift_labels(labels)
    assert targets.tolist() == [[-100, 7, 8], [-100, 3, -100]]
    assert keep.tolist() == [[False, True, True], [False, True, False]]


def test_half_precision_dtype_names_are_checked(tiny_benchmark):
    with pytest.raises(ValueError, match="dtype must be one of"):
        _lm(tiny_benchmark, dtype="float64")


def test_half_precision_parameters_cannot_train_beside_float32_ones():
    model = nn.ModuleDict({"projector": nn.Linear(4, 4), "language_model": nn.Linear(4, 4).bfloat16()})
    paradigm = VLMParadigm(model, NextTokenLoss())
    with pytest.raises(ValueError, match="half-precision parameters would train beside float32 ones"):
        paradigm.parameter_groups()
    paradigm.model["language_model"].requires_grad_(False)  # frozen, as a half-precision LM should be
    assert sum(len(group["params"]) for group in paradigm.parameter_groups()) == 2
    paradigm.model.bfloat16().requires_grad_(True)  # all half: the trainer's choice (precision="bf16-true")
    assert sum(len(group["params"]) for group in paradigm.parameter_groups()) == 4
