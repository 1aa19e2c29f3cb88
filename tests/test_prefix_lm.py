"""PaliGemma's prefix-LM: the mask cell by cell, position ids, equivalence with LLaVA when the prefix is causal,
hand-written decoding against transformers' generate, and an overfit batch."""

from __future__ import annotations

import pytest
import torch

from lightning_vlm.adapters import MLP
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.models.prefix_lm import PrefixLM, position_ids, prefix_attention_mask

from conftest import text_loss

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}


def test_prefix_mask_is_bidirectional_over_the_prefix_and_causal_after_it():
    padding = torch.tensor([[1, 1, 1, 1, 1, 0]])
    mask = prefix_attention_mask(padding, torch.tensor([3]))[0].int()
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0],  # prefix (positions 0-2): sees the whole prefix, nothing after it
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # suffix: causal
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],  # padding: never a key but for itself (its output is never read)
    ])
    assert torch.equal(mask, expected)
    causal = prefix_attention_mask(padding, torch.tensor([3]), bidirectional=False)[0].int()
    assert torch.equal(causal[:5, :5], torch.tril(torch.ones(5, 5, dtype=torch.int)))


def test_position_ids_sequential_or_one_per_image():
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])  # left-padded; two images of two tokens, text between
    image_slot = torch.tensor([[-1, 0, 1, -1, 0, 1, -1, -1]])
    assert position_ids(padding, image_slot, False).tolist() == [[0, 0, 1, 2, 3, 4, 5, 6]]
    assert position_ids(padding, image_slot, True).tolist() == [[0, 0, 0, 1, 2, 2, 3, 4]]


def build(cls, tokenizer: str, **kwargs):
    torch.manual_seed(0)
    return cls(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
               LanguageModel(tokenizer=tokenizer, config=TINY_LM), MLP(), **kwargs).eval()


@pytest.fixture(scope="module")
def vqa_batch(tiny_benchmark):
    return next(iter(ShardDataModule(root=tiny_benchmark, tasks={"vqa": 1}, batch_size=6).train_dataloader()))


def test_a_causal_prefix_with_sequential_positions_is_llava(tiny_benchmark, vqa_batch):
    args = (vqa_batch["pixel_values"], vqa_batch["input_ids"], vqa_batch["attention_mask"], vqa_batch["labels"])
    llava = text_loss(build(LLaVA, tiny_benchmark), *args)
    causal = text_loss(build(PrefixLM, tiny_benchmark, prefix_attention="causal"), *args)
    bidirectional = text_loss(build(PrefixLM, tiny_benchmark), *args)
    shared = text_loss(build(PrefixLM, tiny_benchmark, prefix_attention="causal", image_positions="shared"), *args)
    assert torch.allclose(causal, llava, atol=1e-5)
    assert not torch.allclose(bidirectional, llava, atol=1e-4)
    assert shared.item() != llava.item()  # other rotary positions for the image tokens (a small change at init)


def test_hand_written_greedy_decoding_matches_transformers_generate(tiny_benchmark):
    llava, prefix = build(LLaVA, tiny_benchmark), build(PrefixLM, tiny_benchmark, prefix_attention="causal")
    tokenizer = llava.language_model.tokenizer
    tokenizer.padding_side = "left"
    prompt = tokenizer(["what colour is the square?", "how many?"], return_tensors="pt", padding=True)
    images = torch.randn(2, 3, 64, 64)
    expected = llava.generate(images, prompt.input_ids, prompt.attention_mask, max_new_tokens=6, do_sample=False)
    got = prefix.generate(images, prompt.input_ids, prompt.attention_mask, max_new_tokens=6)
    assert torch.equal(got, expected[:, : got.shape[1]])
    assert build(PrefixLM, tiny_benchmark).generate(images, prompt.input_ids, prompt.attention_mask,
                                                    max_new_tokens=3, do_sample=True, top_p=0.9).shape[0] == 2


def test_prefix_lm_overfits_one_batch(tiny_benchmark, vqa_batch):
    model = build(PrefixLM, tiny_benchmark, image_positions="shared").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    args = (vqa_batch["pixel_values"], vqa_batch["input_ids"], vqa_batch["attention_mask"], vqa_batch["labels"])
    first = text_loss(model, *args).item()
    for _ in range(40):
        loss = text_loss(model, *args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.35 * first, (first, loss.item())
