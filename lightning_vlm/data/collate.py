"""Tokenise formatted examples and collate them into the batch dict every paradigm consumes.

Text layout: ``[BOS] system prompt target [EOS]`` (``[CLS] ... [SEP]`` for tokenizers without BOS/EOS, as BERT);
a tokenizer with a chat template (a chat LM's) renders system, user prompt and assistant target through it
instead, with labels on the reply and its end-of-turn token only (data/chat.py).
Labels are an unshifted copy of the ids on ``target [EOS]`` and -100 elsewhere; the causal shift happens
in exactly one place, the LM loss. Contrastive examples carry no labels at all; their hard-negative captions,
when drawn, come as ``negative_input_ids`` / ``negative_attention_mask`` (B * k, L), example by example, with
``negative_valid`` (B * k,) False where an example had fewer than k. With a ``caption_tokenizer`` (a second
text consumer, e.g. BLIP-2's Q-Former beside its LM), every example's caption is also tokenised by it, laid out
as a contrastive text: ``caption_input_ids`` / ``caption_attention_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from lightning_vlm.data.chat import chat_ids, generation_prompt_ids, has_chat_template
from lightning_vlm.data.tasks import TextExample

IGNORE_INDEX = -100


@dataclass
class Example:
    """One prepared sample: normalised pixels, its text pair, and metadata kept for evaluation and logging."""

    pixel_values: torch.Tensor
    text: TextExample
    meta: dict = field(default_factory=dict)


@dataclass
class Collator:
    """Turns a list of `Example` into the batch dict (see the DataModule docs for its fields)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 64
    caption_tokenizer: PreTrainedTokenizerBase | None = None

    def __post_init__(self) -> None:
        self._captions = Collator(self.caption_tokenizer, self.max_length) if self.caption_tokenizer else None
        tok = self.tokenizer
        self.start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        self.end_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.end_id
        if None in (self.start_id, self.end_id, self.pad_id):
            raise ValueError(f"tokenizer {tok.name_or_path!r} needs BOS or CLS, EOS or SEP, and a pad token")

    def __call__(self, examples: list[Example], num_skipped: int = 0, num_read_errors: int = 0) -> dict:
        input_ids, attention_mask, labels = self._pad([self.encode(ex.text) for ex in examples])
        batch = {
            "pixel_values": torch.stack([ex.pixel_values for ex in examples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "meta": [dict(ex.meta, task=ex.text.task, prompt=ex.text.prompt, target=ex.text.target,
                          system=ex.text.system) for ex in examples],
            "num_skipped": num_skipped,
            "num_read_errors": num_read_errors,
        }
        negatives = [text for ex in examples for text in ex.text.negatives]
        if negatives:
            batch["negative_input_ids"], batch["negative_attention_mask"] = self.tokenize([t or "" for t in negatives])
            batch["negative_valid"] = torch.tensor([t is not None for t in negatives])
        if self._captions is not None:
            captions = [ex.meta["caption"] for ex in examples]
            batch["caption_input_ids"], batch["caption_attention_mask"] = self._captions.tokenize(captions)
        return batch

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of plain texts laid out as contrastive examples (for evaluation prompts)."""
        input_ids, attention_mask, _ = self._pad([self.encode(TextExample("contrastive", "", t)) for t in texts])
        return input_ids, attention_mask

    def prompts(self, prompts: list[str], system: str = "", history: Sequence[tuple[str, str]] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of ``[BOS] system prompt`` (or the chat up to the assistant's turn),
        LEFT-padded: the layout generation continues from. ``history``: (user, assistant) turns before each
        prompt, e.g. few-shot demonstrations."""
        if has_chat_template(self.tokenizer):
            rows = [generation_prompt_ids(self.tokenizer, p, system or None, history) for p in prompts]
        else:
            before = [system, *(f"{user} {reply}" for user, reply in history)]
            rows = [[self.start_id] + self.tokenizer.encode(" ".join(filter(None, [*before, p])),
                                                            add_special_tokens=False) for p in prompts]
        input_ids, attention_mask, _ = self._pad([(ids, []) for ids in rows], left=True)
        return input_ids, attention_mask

    def _pad(self, rows: list[tuple[list[int], list[int]]], left: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels) rows padded to one length, on the right (training) or the left (generation prompts)."""
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            span = slice(length - len(ids), length) if left else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            if lab:
                labels[i, span] = torch.tensor(lab)
            attention_mask[i, span] = 1
        return input_ids, attention_mask, labels

    def encode(self, text: TextExample) -> tuple[list[int], list[int]]:
        """Token ids and labels of one example, truncated to `max_length` (the end token is kept; a chat is cut
        at `max_length`)."""
        if text.task != "contrastive" and has_chat_template(self.tokenizer):
            ids, labels = chat_ids(self.tokenizer, [(text.prompt, text.target)], text.system or None)
            return ids[: self.max_length], labels[: self.max_length]
        words = " ".join(filter(None, [text.system, text.prompt]))
        prompt = self.tokenizer.encode(words, add_special_tokens=False) if words else []
        target = self.tokenizer.encode(text.target, add_special_tokens=False)
        ids = ([self.start_id] + prompt + target)[: self.max_length - 1] + [self.end_id]
        supervised = max(0, len(ids) - 1 - len(prompt)) if text.task != "contrastive" else 0  # target + end
        return ids, [IGNORE_INDEX] * (len(ids) - supervised) + ids[len(ids) - supervised :]
