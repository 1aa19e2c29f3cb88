"""Activation checkpointing, one key per part (vision encoder, text encoder, Q-Former, LM): the same loss and the
same gradients with it as without."""

from __future__ import annotations

import pytest
import torch

from lightning_vlm.adapters import QFormer
from lightning_vlm.encoders import LanguageModel, TextEncoder, VisionEncoder
from lightning_vlm.losses import next_token_loss

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_CNN = {"norm_layer": "groupnorm1", "channels": [8, 16, 32, 64], "stem_width": 8, "layers": [1, 1, 1, 1]}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}


def loss_and_grads(build, run, layer: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss, the gradients, and how often a module of the first layer ran forward (twice when the layer's
    activations were recomputed in backward)."""
    torch.manual_seed(0)
    part = build()
    part.train()
    calls, module = [], part.get_submodule(layer)
    forward = module.forward  # counted by wrapping forward: forward hooks do not fire when checkpointing recomputes
    module.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    torch.manual_seed(1)  # the same dropout masks in both runs
    loss = run(part)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in part.named_parameters() if p.grad is not None}, len(calls)


def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


CASES = {
    "vit": (lambda on, root: VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT, num_extra_tokens=2,
                                     grad_checkpointing=on),
            lambda part, root: part(pixels()).tokens.square().mean()),
    "cnn": (lambda on, root: VisionEncoder("resnet10t", overrides=TINY_CNN, grad_checkpointing=on),
            lambda part, root: part(pixels()).pooled.square().mean()),
    "text": (lambda on, root: TextEncoder(vocab_size=50, config=TINY_BERT, grad_checkpointing=on),
             lambda part, root: part(torch.arange(12).view(2, 6) + 5, torch.ones(2, 6)).pooled.square().mean()),
    "qformer": (lambda on, root: QFormer(32, config=TINY_BERT, tokenizer=root, num_queries=4, grad_checkpointing=on),
                lambda part, root: part(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)),
                                        torch.arange(8).view(2, 4) + 5).queries.square().mean()),
}


FIRST_LAYER = {"vit": "model.blocks.0.mlp", "cnn": "model.layer1.0.conv1", "text": "model.encoder.layer.0.intermediate",
               "qformer": "layers.0", "lm": "model.model.layers.0.mlp"}  # a module the checkpointed layer calls


@pytest.mark.parametrize("case", [*CASES, "lm"])
def test_checkpointing_changes_neither_the_loss_nor_the_gradients(case, tiny_benchmark):
    if case == "lm":
        def build(on, root):
            return LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM, grad_checkpointing=on)

        def run(part, root):
            ids = torch.arange(12).view(2, 6) + 5
            return next_token_loss(part(part.embed(ids), torch.ones_like(ids), ids))
    else:
        build, run = CASES[case]
    layer = FIRST_LAYER[case]
    plain, plain_grads, plain_calls = loss_and_grads(lambda: build(False, tiny_benchmark),
                                                     lambda part: run(part, tiny_benchmark), layer)
    checkpointed, grads, calls = loss_and_grads(lambda: build(True, tiny_benchmark),
                                                lambda part: run(part, tiny_benchmark), layer)
    assert (plain_calls, calls) == (1, 2)  # checkpointed: recomputed in backward
    assert torch.equal(plain, checkpointed)
    assert plain_grads.keys() == grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
