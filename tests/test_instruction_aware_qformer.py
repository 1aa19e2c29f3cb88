"""InstructBLIP's instruction-aware Q-Former inside LLaVA: the queries read each image's prompt, never its answer;
only the queries reach the LM; without the option the adapter is BLIP-2's, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_vlm.adapters.qformer import QFormer, QFormerAdapter
from lightning_vlm.compare.config import load_comparison
from lightning_vlm.compare.run import check_entries
from lightning_vlm.data.collate import Collator, Example
from lightning_vlm.data.tasks import TextExample
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.tokens import IMAGE_TOKEN

REPO = Path(__file__).parents[1]
TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1}
QFORMER = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
QUERIES = 2


def build(tokenizer: str, instruction_aware: bool = True) -> LLaVA:
    torch.manual_seed(0)
    adapter = QFormerAdapter(QUERIES, config=QFORMER, instruction_aware=instruction_aware)
    model = LLaVA(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                  LanguageModel(tokenizer=tokenizer, config=TINY_LM), adapter)
    return model.eval()


def training_batch(model: LLaVA, pairs: list[tuple[str, str]]) -> dict:
    """A collated training batch (prompt + answer, labels on the answer) of one fixed image per pair."""
    collate = Collator(model.language_model.tokenizer, image_token=IMAGE_TOKEN)
    pixels = torch.randn(len(pairs), 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return collate([Example(pixels[i], TextExample("vqa", prompt, answer)) for i, (prompt, answer) in enumerate(pairs)])


def adapter_calls(model: LLaVA) -> list[tuple[tuple, torch.Tensor]]:
    """Records every call of the adapter: its arguments and its output."""
    calls = []
    model.projector.register_forward_hook(lambda module, args, out: calls.append((args, out)))
    return calls


def test_queries_read_the_prompt_and_never_the_answer_in_training_layout(tiny_benchmark):
    model = build(tiny_benchmark)
    calls = adapter_calls(model)
    outputs = {}
    for name, pairs in {"base": [("what colour is the square?", "red"), ("what shape is it?", "circle")],
                        "answers": [("what colour is the square?", "blue green"), ("what shape is it?", "square")],
                        "prompt": [("what shape is the square?", "red"), ("what shape is it?", "circle")]}.items():
        batch = training_batch(model, pairs)
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                    batch["image_index"])
        assert out.hidden.shape[1] == batch["input_ids"].shape[1] - 1 + QUERIES  # the placeholder became M tokens
        (_, ids, mask), queries = calls[-1]
        outputs[name] = queries
        words = [ids[row][mask[row].bool()].tolist() for row in range(len(pairs))]
        tokenizer = model.language_model.tokenizer
        assert words == [tokenizer.encode(prompt, add_special_tokens=False) for prompt, _ in pairs]  # prompt only
    assert outputs["base"].shape == (2, QUERIES, TINY_LM["hidden_size"])
    assert torch.equal(outputs["answers"], outputs["base"])  # other answers: the very same queries
    assert not torch.allclose(outputs["prompt"][0], outputs["base"][0])  # another instruction: other queries
    assert torch.equal(outputs["prompt"][1], outputs["base"][1])  # each image reads its own row's instruction


def test_only_the_queries_are_placed_in_the_lm_input(tiny_benchmark):
    model = build(tiny_benchmark)
    batch = training_batch(model, [("what colour is the square?", "red"), ("is it big?", "no")])
    sequence = model.interleave(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                batch["image_index"], batch["labels"])
    assert ((sequence.image_slot >= 0).sum(dim=1) == QUERIES).all()  # M image tokens per row, no instruction tokens
    text_embeds = model.language_model.embed(batch["input_ids"])
    placeholder = (batch["input_ids"] == model.language_model.image_token_id).int().argmax(dim=1)
    for row in range(2):  # the text around the image is the LM's own embeddings, in order
        start = int(placeholder[row])
        torch.testing.assert_close(sequence.embeds[row, :start], text_embeds[row, :start])
        length = int(batch["attention_mask"][row].sum())
        torch.testing.assert_close(sequence.embeds[row, start + QUERIES: length - 1 + QUERIES],
                                   text_embeds[row, start + 1: length])


def test_generation_reads_the_prompt_as_the_instruction(tiny_benchmark):
    model = build(tiny_benchmark)
    calls = adapter_calls(model)
    collate = Collator(model.language_model.tokenizer, image_token=IMAGE_TOKEN)
    prompts = ["what colour is the square?", "is it big?"]
    ids, mask = collate.prompts(prompts)  # left-padded
    pixels = torch.randn(2, 3, 64, 64)
    new = model.generate(pixels, ids, mask, max_new_tokens=3)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 3
    (_, instruction, instruction_mask), queries = calls[-1]
    tokenizer = model.language_model.tokenizer
    assert [instruction[row][instruction_mask[row].bool()].tolist() for row in range(2)] == [
        tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
    other_ids, other_mask = collate.prompts(["is it big?", "is it big?"])
    model.generate(pixels, other_ids, other_mask, max_new_tokens=1)
    assert not torch.allclose(calls[-1][1][0], queries[0]) and torch.equal(calls[-1][1][1], queries[1])


def test_every_instruction_aware_parameter_trains(tiny_benchmark):
    model = build(tiny_benchmark).train()
    batch = training_batch(model, [("what colour is the square?", "red"), ("is it big?", "no")])
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.hidden.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    vocab = model.language_model.model.get_input_embeddings().num_embeddings
    assert model.projector.qformer.word_embeddings.num_embeddings == vocab


def test_the_option_needs_an_instruction_and_the_vocabulary():
    with pytest.raises(ValueError, match="for_vocabulary"):
        QFormerAdapter(QUERIES, config=QFORMER, instruction_aware=True).build(8, 6)
    adapter = QFormerAdapter(QUERIES, config=QFORMER, instruction_aware=True).for_vocabulary(10).build(8, 6)
    with pytest.raises(ValueError, match="not given an instruction"):
        adapter(torch.randn(1, 4, 8))
    out = adapter(torch.randn(2, 4, 8), torch.tensor([[3, 4], [5, 0]]), torch.tensor([[1, 1], [1, 0]]))
    assert out.shape == (2, QUERIES, 6)
    table = adapter.qformer.position_embeddings.num_embeddings
    image, long = torch.randn(1, 4, 8), torch.randint(10, (1, table + 5))  # past the position table: its start is read
    assert torch.equal(adapter.eval()(image, long), adapter(image, long[:, :table], torch.ones(1, table).long()))
    with pytest.raises(ValueError, match="was given an instruction"):
        QFormerAdapter(QUERIES, config=QFORMER).build(8, 6)(torch.randn(1, 4, 8), torch.ones(1, 2, dtype=torch.long))


def test_without_the_option_the_adapter_is_blip2s_bit_for_bit(tiny_benchmark):
    """Against the queries-only construction the adapter had before the option, from the same seed."""
    torch.manual_seed(0)
    reference = QFormer(8, config={**QFormerAdapter().config, **QFORMER}, num_queries=QUERIES, vocab_size=1)
    del reference.word_embeddings, reference.position_embeddings, reference.decoder_token
    for layer in reference.layers:
        layer.text_ffn = nn.Identity()
    proj = nn.Linear(reference.width, 6)
    torch.manual_seed(0)
    adapter = QFormerAdapter(QUERIES, config=QFORMER).build(8, 6)
    expected = {**{f"qformer.{k}": v for k, v in reference.state_dict().items()},
                **{f"proj.{k}": v for k, v in proj.state_dict().items()}}
    assert adapter.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in adapter.state_dict().items())
    tokens = torch.randn(2, 10, 8)
    assert torch.equal(adapter(tokens), proj(reference(tokens).queries))

    model = build(tiny_benchmark, instruction_aware=False)
    assert not model.reads_instruction
    batch = training_batch(model, [("what colour is the square?", "red"), ("is it big?", "no")])
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_index"], batch["labels"])
    ours, plain = model.interleave(*args), super(LLaVA, model).interleave(*args)
    assert torch.equal(ours.embeds, plain.embeds) and torch.equal(ours.mask, plain.mask)


def test_the_comparison_entry_passes_the_checks(tiny_benchmark, tmp_path, monkeypatch):
    """As `python -m lightning_vlm compare` checks it before training (from a checkout whose data is tiny)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(tiny_benchmark)  # where the recipe reads data and tokenizer
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    comparison = load_comparison(REPO / "comparisons" / "adapters.yaml")
    labels = [entry.label for entry in comparison.entries]
    assert labels.index("qformer-instruct-1") == labels.index("qformer-1") + 1
    entry = comparison.entries[labels.index("qformer-instruct-1")]
    answers = check_entries(comparison, tmp_path / "out", [entry])
    assert set(comparison.yardstick) <= answers["qformer-instruct-1"]
