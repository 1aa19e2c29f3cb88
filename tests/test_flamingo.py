"""Flamingo: the media mask forbids later images, gates at 0 leave the LM unchanged, gradients reach the gates of a
frozen LM, beam search sees the image, and a batch overfits."""

from __future__ import annotations

import pytest
import torch

from lightning_vlm.adapters import PerceiverResampler
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.cross_attention import media_attention_mask
from lightning_vlm.models.flamingo import Flamingo

from conftest import text_loss

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}


def test_a_text_token_attends_only_to_the_most_recent_image_before_it():
    text_image = torch.tensor([[-1, 0, 0, 1, 1]])  # a token before any image, two after image 0, two after image 1
    media_image = torch.tensor([[0, 0, 1, 1]])  # two visual tokens per image
    expected = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(media_attention_mask(text_image, media_image)[0], expected)


def build(tokenizer: str) -> Flamingo:
    torch.manual_seed(0)
    return Flamingo(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                    LanguageModel(tokenizer=tokenizer, config=TINY_LM),
                    PerceiverResampler(num_latents=4, depth=1, num_heads=2), every=1, num_heads=2)


@pytest.fixture(scope="module")
def vqa_batch(tiny_benchmark):
    return next(iter(ShardDataModule(root=tiny_benchmark, tasks={"vqa": 1}, batch_size=6).train_dataloader()))


def args_of(batch):
    return batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"]


def test_gates_at_zero_leave_the_language_model_unchanged(tiny_benchmark, vqa_batch):
    model = build(tiny_benchmark).eval()
    images, ids, mask, labels = args_of(vqa_batch)
    lm = model.language_model
    text_only = text_loss(lm, lm.embed(ids), mask, labels)
    assert torch.equal(text_loss(model, images, ids, mask, labels), text_only)
    for block in model.cross_attention.blocks:
        block.attention_gate.data.fill_(0.5)
        block.feed_forward_gate.data.fill_(0.5)
    opened = text_loss(model, images, ids, mask, labels)
    assert not torch.allclose(opened, text_only)
    assert not torch.allclose(text_loss(model, images.flip(0), ids, mask, labels), opened)


def test_a_frozen_lm_trains_the_resampler_and_gates_only(tiny_benchmark, vqa_batch):
    model = build(tiny_benchmark)
    model.language_model.requires_grad_(False)
    model.vision.requires_grad_(False)
    text_loss(model, *args_of(vqa_batch)).backward()
    with_grad = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"cross_attention", "resampler"}  # nothing reaches the frozen LM or image encoder
    nonzero = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert nonzero and all(name.endswith("_gate") for name in nonzero)  # gates at 0: only they move at first


def test_generation_reads_the_image_also_under_beam_search(tiny_benchmark):
    model = build(tiny_benchmark).eval()
    for block in model.cross_attention.blocks:
        block.attention_gate.data.fill_(1.0)
    tokenizer = model.language_model.tokenizer
    tokenizer.padding_side = "left"
    prompt = tokenizer(["what colour is the square?", "how many?"], return_tensors="pt", padding=True)
    out = model.generate(torch.randn(2, 3, 64, 64), prompt.input_ids, prompt.attention_mask, max_new_tokens=4,
                         num_beams=2)
    assert out.shape[0] == 2 and model.cross_attention._condition is None  # the image is released after decoding


def test_flamingo_overfits_one_batch(tiny_benchmark, vqa_batch):
    model = build(tiny_benchmark).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = text_loss(model, *args_of(vqa_batch)).item()
    for _ in range(40):
        loss = text_loss(model, *args_of(vqa_batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.35 * first, (first, loss.item())
