"""Images placed where their placeholders stand: the splice cell by cell, the labels of every task format (caption,
VQA, grounding, multi-turn chat, few-shot), and the models reading exactly the images a row shows."""

from __future__ import annotations

import random

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_vlm.callbacks import SampleImageLogger
from lightning_vlm.data.collate import Collator, Example, first_rows
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.tasks import TaskFormatter, TextExample
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.flamingo import Flamingo
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.models.prefix_lm import PrefixLM
from lightning_vlm.models.visual_prompt import place_images
from lightning_vlm.paradigms.generative import ImageToText
from lightning_vlm.tokens import IGNORE_INDEX, IMAGE_TOKEN

from conftest import text_loss

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}
P = 9  # the placeholder id in the splice tests


def test_placeholders_are_replaced_by_the_images_they_show_cell_by_cell():
    visual = torch.arange(1, 7, dtype=torch.float).view(3, 2, 1) * 100  # 3 images of 2 tokens: 100,200 | 300,400 | ...
    ids = torch.tensor([[1, P, 2, P, 3], [1, P, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, -100, 3], [-100, -100, 4, -100, -100]])
    out = place_images(visual, ids[..., None].float(), ids, mask, P, torch.tensor([[2, 0], [1, -1]]), labels)
    assert out.embeds[0, :, 0].tolist() == [1, 500, 600, 2, 100, 200, 3]
    assert out.embeds[1, :4, 0].tolist() == [1, 300, 400, 4]  # then end padding, masked out
    assert out.mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]
    assert out.labels.tolist() == [[-100] * 6 + [3], [-100, -100, -100, 4, -100, -100, -100]]
    assert out.image_slot.tolist() == [[-1, 0, 1, -1, 0, 1, -1], [-1, 0, 1, -1, -1, -1, -1]]


def test_text_without_placeholders_reads_its_image_first_and_extra_placeholders_are_refused():
    visual = torch.tensor([[[10.0]], [[20.0]]])
    ids = torch.tensor([[1, 2], [1, 3]])
    out = place_images(visual, ids[..., None].float(), ids, torch.ones_like(ids), P)
    assert out.embeds[..., 0].tolist() == [[10, 1, 2], [20, 1, 3]] and out.mask.all()
    with pytest.raises(ValueError, match="more image placeholders"):
        place_images(visual, ids[..., None].float(), torch.tensor([[P, P], [1, P]]), torch.ones_like(ids), P)


def test_splice_gradients_reach_the_images_shown_and_only_those():
    visual = torch.randn(3, 2, 4, requires_grad=True)
    ids = torch.tensor([[P, 1, P, 2]])
    embeds = torch.randn(1, 4, 4, requires_grad=True)
    place_images(visual, embeds, ids, torch.ones_like(ids), P, torch.tensor([[2, 0]])).embeds.sum().backward()
    assert visual.grad[0].abs().sum() > 0 and visual.grad[2].abs().sum() > 0 and visual.grad[1].abs().sum() == 0
    assert embeds.grad[0, [1, 3]].abs().sum() > 0 and embeds.grad[0, [0, 2]].abs().sum() == 0  # placeholders unused


# ---- the data side: labels of every task format -----------------------------------------------------------------
def sample(key: str, qa: list[tuple[str, str]], objects: list[dict] | None = None) -> RawSample:
    return RawSample(key, None, f"a caption of {key}.",
                     {"qa": [{"question": q, "answer": a, "skill": "color"} for q, a in qa], "objects": objects or []})


@pytest.fixture(scope="module")
def tokenizer(tiny_benchmark):
    return LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM, location_bins=8).tokenizer


def collate(tokenizer, texts: list[TextExample], shots: int = 2) -> dict:
    examples = [Example(torch.zeros(3, 4, 4), text, {"key": str(i), "caption": ""}) for i, text in enumerate(texts)]
    return Collator(tokenizer, 128, image_token=IMAGE_TOKEN, shots=shots)(examples)


def labelled_text(tokenizer, batch: dict, row: int) -> list[str]:
    """The decoded runs of labelled tokens of a row."""
    runs, current = [], []
    for token, label in zip(batch["input_ids"][row].tolist(), batch["labels"][row].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def placeholders(tokenizer, batch: dict, row: int) -> int:
    return int((batch["input_ids"][row] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum())


@pytest.mark.parametrize("task", ["caption", "vqa", "grounding"])
def test_single_turn_tasks_place_one_image_before_the_prompt_and_label_the_answer_only(tokenizer, task):
    formatter = TaskFormatter({task: 1.0}, loc_bins=8)
    objects = [{"color": "red", "shape": "circle", "size": "large", "box": [8, 8, 40, 40]}]
    text = formatter(sample("a", [("what colour is the circle?", "red")], objects), 64, random.Random(0))
    batch = collate(tokenizer, [text])
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[1] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert placeholders(tokenizer, batch, 0) == 1 and batch["image_index"].tolist() == [[0]]
    assert labelled_text(tokenizer, batch, 0) == [tokenizer.decode(
        tokenizer.encode(text.target, add_special_tokens=False) + [tokenizer.eos_token_id])]
    if task == "grounding":
        assert text.target == "<loc_1><loc_1><loc_5><loc_5>"


def test_a_chat_labels_every_reply_and_shows_the_image_once(tokenizer):
    qa = [("what colour is the circle?", "red"), ("how many objects are there?", "one"), ("is it large?", "yes")]
    text = TaskFormatter({"chat": 1.0}, chat_turns=3)(sample("a", qa), 64, random.Random(0))
    assert len(text.history) == 2 and text.task == "chat"
    batch = collate(tokenizer, [text])
    replies = [reply for _, reply in text.history] + [text.target]
    assert labelled_text(tokenizer, batch, 0) == [f"{reply} [EOS]" for reply in replies]
    assert placeholders(tokenizer, batch, 0) == 1
    assert batch["meta"][0]["history"] == text.history


def test_fewshot_shows_demonstration_images_from_the_batch_and_labels_the_last_answer(tokenizer):
    formatter = TaskFormatter({"fewshot": 1.0})
    texts = [formatter(sample(k, [(f"question {k}?", f"answer {k}")]), 64, random.Random(0)) for k in "abcd"]
    batch = collate(tokenizer, texts, shots=2)
    assert batch["image_index"].tolist() == [[1, 2, 0], [2, 3, 1], [3, 0, 2], [0, 1, 3]]
    for row, key in enumerate("abcd"):
        assert placeholders(tokenizer, batch, row) == 3
        assert labelled_text(tokenizer, batch, row) == [f"answer {key} [EOS]"]  # demonstrations unlabelled
        shown = "abcd"[(row + 1) % 4], "abcd"[(row + 2) % 4]
        assert batch["meta"][row]["history"] == [(f"question {k}?", f"answer {k}") for k in shown]


@pytest.mark.slow  # the packaged SmolLM2 tokenizer, prepared by the slow fixture
def test_a_chat_template_puts_the_placeholder_in_the_first_user_turn(real_checkpoints):
    lm = LanguageModel(tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct", config=TINY_LM)
    text = TextExample("chat", "and its shape?", "circle", history=[("what colour is it?", "red")])
    batch = collate(lm.tokenizer, [text])
    rendered = lm.tokenizer.decode(batch["input_ids"][0])
    assert rendered.count(IMAGE_TOKEN) == 1 and f"user\n{IMAGE_TOKEN}\nwhat colour is it?" in rendered
    assert labelled_text(lm.tokenizer, batch, 0) == ["red<|im_end|>", "circle<|im_end|>"]


# ---- the models read exactly the images a row shows -------------------------------------------------------------
def build(kind: str, tokenizer: str):
    torch.manual_seed(0)
    vision, lm = VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT), LanguageModel(tokenizer=tokenizer,
                                                                                          config=TINY_LM)
    if kind == "flamingo":
        return Flamingo(vision, lm, num_heads=2).eval()
    return (PrefixLM(vision, lm) if kind == "prefix" else LLaVA(vision, lm)).eval()


def fewshot_batch(paradigm: ImageToText, root: str) -> dict:
    dm = ShardDataModule(root=root, tasks={"fewshot": 1.0}, batch_size=4, shots=1)
    dm.trainer = type("T", (), {"lightning_module": paradigm, "global_rank": 0, "world_size": 1, "current_epoch": 0})()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("kind", ["llava", "prefix", "flamingo"])
def test_a_fewshot_row_reads_its_demonstration_image_and_not_the_others(tiny_benchmark, kind):
    model = build(kind, tiny_benchmark)
    for block in getattr(getattr(model, "cross_attention", None), "blocks", []):  # open Flamingo's gates
        torch.nn.init.constant_(block.attention_gate, 1.0)
    batch = fewshot_batch(ImageToText(model), tiny_benchmark)
    assert batch["image_index"].tolist() == [[1, 0], [2, 1], [3, 2], [0, 3]]

    def row_loss(pixels: torch.Tensor) -> torch.Tensor:  # row 0's text over all four images of the batch
        return text_loss(model, pixels, batch["input_ids"][:1], batch["attention_mask"][:1], batch["labels"][:1],
                             batch["image_index"][:1])

    pixels = batch["pixel_values"]
    base = row_loss(pixels)
    changed = {}
    for image in range(4):
        other = pixels.clone()
        other[image] = torch.randn_like(other[image])
        changed[image] = not torch.allclose(row_loss(other), base)
    assert changed == {0: True, 1: True, 2: False, 3: False}  # row 0 shows image 1 (demonstration), then image 0


@pytest.mark.parametrize("kind", ["llava", "prefix", "flamingo"])
def test_fewshot_evaluation_generates_from_the_interleaved_prompt(tiny_benchmark, kind):
    paradigm = ImageToText(build(kind, tiny_benchmark), generation={"max_new_tokens": 3})
    batch = fewshot_batch(paradigm, tiny_benchmark)
    answers = paradigm._answers(batch)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    ids, _ = Collator(paradigm.tokenizer, image_token=IMAGE_TOKEN).generation_inputs(
        [TextExample("fewshot", m["prompt"], "", history=m["history"]) for m in batch["meta"]])
    assert ((ids == paradigm.model.language_model.image_token_id).sum(1) == 2).all()


@pytest.mark.parametrize("kind", ["llava", "prefix", "flamingo"])
def test_a_bfloat16_lm_reads_the_interleaved_batch_as_the_float32_one_does(tiny_benchmark, kind):
    """A frozen LM kept in bfloat16 (LanguageModel(dtype=...)) under float32 visual tokens, prefix masks and
    Flamingo's float32 cross-attention blocks: the same loss within bf16 rounding, and generation runs."""
    model = build(kind, tiny_benchmark)
    for block in getattr(getattr(model, "cross_attention", None), "blocks", []):  # open Flamingo's gates
        torch.nn.init.constant_(block.attention_gate, 1.0)
    paradigm = ImageToText(model, generation={"max_new_tokens": 3})
    batch = fewshot_batch(paradigm, tiny_benchmark)
    inputs = [batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels", "image_index")]
    reference = text_loss(model, *inputs)
    model.language_model.model.bfloat16()
    assert torch.allclose(text_loss(model, *inputs), reference, rtol=3e-2)
    assert len(paradigm._answers(batch)) == 4


def test_first_rows_bring_the_demonstration_images_they_show(tiny_benchmark):
    paradigm = ImageToText(build("llava", tiny_benchmark), generation={"max_new_tokens": 3})
    batch = fewshot_batch(paradigm, tiny_benchmark)  # row 1 shows image 2, then its own
    head = first_rows(batch, 2)
    assert head["image_index"].tolist() == [[1, 0], [2, 1]] and len(head["pixel_values"]) == 3
    for row in range(2):
        for new, old in zip(head["image_index"][row], batch["image_index"][row]):
            assert torch.equal(head["pixel_values"][new], batch["pixel_values"][old])
    assert paradigm._answers(head) == paradigm._answers(batch)[:2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_first_rows_of_a_batch_on_the_gpu(tiny_benchmark):
    """The sample logger's rows of a GPU batch (this failed on an H200: the renumbering table stayed on the CPU)."""
    paradigm = ImageToText(build("llava", tiny_benchmark), generation={"max_new_tokens": 3})
    batch = fewshot_batch(paradigm, tiny_benchmark)
    on_gpu = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    head = first_rows(on_gpu, 2)
    assert head["image_index"].device.type == "cuda"
    assert head["image_index"].tolist() == first_rows(batch, 2)["image_index"].tolist()


def test_fewshot_training_evaluates_and_draws_samples(tiny_benchmark, tmp_path):
    """A fit over few-shot batches: the sample grid generates from rows whose demonstrations lie beyond it."""
    paradigm = ImageToText(build("flamingo", tiny_benchmark), eval_max_samples=8, warmup_steps=1,
                           generation={"max_new_tokens": 3})
    dm = ShardDataModule(root=tiny_benchmark, tasks={"fewshot": 1.0}, batch_size=4, shots=2, val_splits=["val"])
    logger = TensorBoardLogger(tmp_path / "runs")
    trainer = L.Trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2,
                        logger=logger, callbacks=[SampleImageLogger(num_samples=2)], enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(paradigm, dm)
    assert "val/fewshot_all" in trainer.callback_metrics
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert len(events.Images("samples")) == 1
