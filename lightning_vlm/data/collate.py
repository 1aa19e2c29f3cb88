"""Tokenise formatted examples and collate them into the batch dict every paradigm consumes.

Text layout: ``[BOS] system prompt target [EOS]`` (``[CLS] ... [SEP]`` for tokenizers without BOS/EOS, as BERT),
a multi-turn example continuing ``prompt2 target2 [EOS] ...``; a tokenizer with a chat template (a chat LM's)
renders system, user prompts and assistant replies through it instead, with labels on the replies and their
end-of-turn tokens only (data/chat.py). Labels are an unshifted copy of the ids on every supervised
``reply [EOS]`` and IGNORE_INDEX elsewhere; the causal shift happens in one place, losses/language.py. A ``text``
example (a text-only source's, for language modelling) is ``[BOS] text [EOS]``, labelled on every token after BOS,
never through a chat template and without an image placeholder.

With an ``image_token`` (the LM's placeholder, for models that place images in the text) the image is written
into the text as that token, before the first prompt (``<image>\nwhat colour is the square?``), and the batch
says which image each placeholder shows: ``image_index`` (B, K), batch rows, -1 padded. A few-shot example
shows ``shots`` other images of its batch first, each with its demonstration question and answer (unlabelled),
then its own image and question; every other example shows its own image once.

Contrastive examples carry no labels at all; their hard-negative captions, when drawn, come as
``negative_input_ids`` / ``negative_attention_mask`` (B * k, L), example by example, with ``negative_valid``
(B * k,) False where an example had fewer than k. With a ``caption_tokenizer`` (a second text consumer, e.g.
BLIP-2's Q-Former beside its LM), every example's caption is also tokenised by it, laid out as a contrastive
text: ``caption_input_ids`` / ``caption_attention_mask``.

With ``pad_images`` (images kept at their own size and aspect ratio) the images are padded at the bottom and right
to the largest of the batch, or to ``pad_to`` (height, width): ``pixel_mask`` (B, H, W) is True on each image's own
pixels, and the padding of ``pixel_values`` is NaN, so a model, which the paradigm hands pixel values alone, reads
the mask off them (`lightning_vlm.encoders.patches.split_padding`) and a reader that ignores it fails loudly instead
of reading grey.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedTokenizerBase

from lightning_vlm.data.chat import chat_ids, generation_prompt_ids, has_chat_template
from lightning_vlm.data.tasks import UNPROMPTED, TextExample
from lightning_vlm.tokens import IGNORE_INDEX


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
    image_token: str | None = None
    shots: int = 2
    pad_images: bool = False
    pad_to: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self._captions = Collator(self.caption_tokenizer, self.max_length) if self.caption_tokenizer else None
        tok = self.tokenizer
        self.start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        self.end_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.end_id
        if None in (self.start_id, self.end_id, self.pad_id):
            raise ValueError(f"tokenizer {tok.name_or_path!r} needs BOS or CLS, EOS or SEP, and a pad token")
        if self.image_token is not None and self.image_token not in tok.get_vocab():
            raise ValueError(f"the image placeholder {self.image_token!r} is not in the tokenizer's vocabulary")

    def __call__(self, examples: list[Example], num_skipped: int = 0, num_read_errors: int = 0) -> dict:
        texts, image_index = self._with_demonstrations([ex.text for ex in examples])
        input_ids, attention_mask, labels = self._pad(self._encode_all(texts))
        pixels = [ex.pixel_values for ex in examples]
        pixel_values, pixel_mask = pad_images(pixels, self.pad_to) if self.pad_images else (torch.stack(pixels), None)
        batch = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "meta": [dict(ex.meta, task=text.task, prompt=text.prompt, target=text.target, system=text.system,
                          history=text.history) for ex, text in zip(examples, texts)],
            "num_skipped": num_skipped,
            "num_read_errors": num_read_errors,
        }
        if pixel_mask is not None:
            batch["pixel_mask"] = pixel_mask
        if self.image_token is not None:
            batch["image_index"] = pad_index(image_index)
        negatives = [text for ex in examples for text in ex.text.negatives]
        if negatives:
            batch["negative_input_ids"], batch["negative_attention_mask"] = self.tokenize([t or "" for t in negatives])
            batch["negative_valid"] = torch.tensor([t is not None for t in negatives])
        if self._captions is not None:
            captions = [ex.meta["caption"] for ex in examples]
            batch["caption_input_ids"], batch["caption_attention_mask"] = self._captions.tokenize(captions)
        return batch

    def _with_demonstrations(self, texts: list[TextExample]) -> tuple[list[TextExample], list[list[int]]]:
        """Few-shot examples take the demonstrations of the next ``shots`` rows (cyclically) as earlier turns;
        returns the texts and the batch rows of the images each one shows, in order."""
        image_index = [[row] for row in range(len(texts))]
        for row, text in enumerate(texts):
            if text.task == "fewshot":
                others = [(row + step) % len(texts) for step in range(1, min(self.shots, len(texts) - 1) + 1)]
                texts[row] = replace(text, history=[texts[other].demonstration for other in others])
                image_index[row] = others + [row]
        return texts, image_index

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of plain texts laid out as contrastive examples, ``[BOS] text [EOS]`` truncated
        as `encode` truncates (hard negatives, evaluation prompts), in one batched tokenizer call: per-text calls
        were a third of a CLIP batch's loading time with four negatives per pair."""
        input_ids, attention_mask, _ = self._pad(self._caption_rows(texts))
        return input_ids, attention_mask

    def _caption_rows(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """`encode`'s (ids, labels) of contrastive captions without a system prompt, in one tokenizer call."""
        words = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return [self._truncated([self.start_id, *ids, self.end_id], [IGNORE_INDEX] * (len(ids) + 2)) for ids in words]

    def _encode_all(self, texts: list[TextExample]) -> list[tuple[list[int], list[int]]]:
        """`encode` of every text; the plain contrastive captions among them batched into one tokenizer call."""
        captions = [i for i, text in enumerate(texts) if text.task == "contrastive" and not text.system]
        batched = dict(zip(captions, self._caption_rows([texts[i].target for i in captions])))
        return [batched[i] if i in batched else self.encode(text) for i, text in enumerate(texts)]

    def prompts(self, prompts: list[str], system: str = "", history: Sequence[tuple[str, str]] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of ``[BOS] system prompt`` (or the chat up to the assistant's turn),
        LEFT-padded: the layout generation continues from. ``history``: (user, assistant) turns before each
        prompt, e.g. few-shot demonstrations in text."""
        return self.generation_inputs([TextExample("vqa", p, "", system=system, history=list(history))
                                       for p in prompts])

    def generation_inputs(self, texts: list[TextExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """The left-padded (input_ids, attention_mask) generation continues from, for each text's last prompt
        after its earlier turns (a chat's, a few-shot example's demonstrations); targets are not read."""
        rows = []
        for text in texts:
            turns, _ = self.dialogue(text)
            (*earlier, (prompt, _)) = turns
            if has_chat_template(self.tokenizer):
                rows.append(generation_prompt_ids(self.tokenizer, prompt, text.system or None, earlier))
            else:
                rows.append(self._plain_ids([*earlier, (prompt, None)], [False] * len(turns), text.system)[0])
        input_ids, attention_mask, _ = self._pad([(ids, []) for ids in rows], left=True)
        return input_ids, attention_mask

    def dialogue(self, text: TextExample) -> tuple[list[tuple[str, str]], list[bool]]:
        """The example's (user, reply) turns with its image placeholders written in, and which replies carry
        labels: every reply of a chat, the last of a few-shot example, none of a contrastive caption, all of a text."""
        if text.task in UNPROMPTED:
            return [("", text.target)], [text.task == "text"]
        turns = [*text.history, (text.prompt, text.target)]
        fewshot = text.task == "fewshot"
        turns = [(self._show_image(user) if fewshot or turn == 0 else user, reply)
                 for turn, (user, reply) in enumerate(turns)]
        return turns, [not fewshot or turn == len(turns) - 1 for turn in range(len(turns))]

    def _show_image(self, prompt: str) -> str:
        """The prompt with the image placeholder before it (unless it already places one itself)."""
        if self.image_token is None or self.image_token in prompt:
            return prompt
        return f"{self.image_token}\n{prompt}" if prompt else self.image_token

    def _pad(self, rows: list[tuple[list[int], list[int]]], left: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels) rows padded to one length, on the right (training) or the left (generation prompts); empty
        labels mean none. Padded as lists and converted once: a tensor per row was a tenth of a batch's loading."""
        length = max(len(ids) for ids, _ in rows)

        def padded(values: list[int], fill: int) -> list[int]:
            padding = [fill] * (length - len(values))
            return padding + values if left else values + padding

        input_ids = [padded(ids, self.pad_id) for ids, _ in rows]
        attention_mask = [padded([1] * len(ids), 0) for ids, _ in rows]
        labels = [padded(lab or [IGNORE_INDEX] * len(ids), IGNORE_INDEX) for ids, lab in rows]
        return tuple(torch.tensor(part, dtype=torch.long) for part in (input_ids, attention_mask, labels))

    def encode(self, text: TextExample) -> tuple[list[int], list[int]]:
        """Token ids and labels of one example, truncated to `max_length` (the end token is kept; a chat is cut
        at `max_length`)."""
        turns, supervised = self.dialogue(text)
        if text.task not in UNPROMPTED and has_chat_template(self.tokenizer):
            ids, labels = chat_ids(self.tokenizer, turns, text.system or None, supervised)
            return ids[: self.max_length], labels[: self.max_length]
        return self._truncated(*self._plain_ids(turns, supervised, text.system))

    def _truncated(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """At most `max_length` tokens, the end token kept (labelled if it replaces a labelled token)."""
        if len(ids) <= self.max_length:
            return ids, labels
        cut = self.max_length - 1
        return ids[:cut] + [self.end_id], labels[:cut] + [self.end_id if labels[cut] != IGNORE_INDEX else IGNORE_INDEX]

    def _plain_ids(self, turns: Sequence[tuple[str, str | None]], supervised: Sequence[bool], system: str = ""
                   ) -> tuple[list[int], list[int]]:
        """``[BOS] system user reply [EOS] user reply [EOS] ...`` without a chat template; a final reply of None
        ends the ids after its user text (a generation prompt)."""
        ids, labels = [self.start_id], [IGNORE_INDEX]
        for turn, ((user, reply), labelled) in enumerate(zip(turns, supervised)):
            words = " ".join(filter(None, [system if turn == 0 else "", user]))
            user_ids = self.tokenizer.encode(words, add_special_tokens=False) if words else []
            ids, labels = ids + user_ids, labels + [IGNORE_INDEX] * len(user_ids)
            if reply is not None:
                reply_ids = self.tokenizer.encode(reply, add_special_tokens=False) + [self.end_id]
                ids, labels = ids + reply_ids, labels + (reply_ids if labelled else [IGNORE_INDEX] * len(reply_ids))
        return ids, labels


def pad_images(images: Sequence[torch.Tensor], size: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H_i, W_i) images -> (B, C, H, W) padded at the bottom and right with NaN to the largest (or to ``size``),
    and the (B, H, W) mask of their own pixels."""
    height, width = size or (max(image.shape[1] for image in images), max(image.shape[2] for image in images))
    pixels = images[0].new_full((len(images), images[0].shape[0], height, width), float("nan"))
    mask = torch.zeros(len(images), height, width, dtype=torch.bool)
    for i, image in enumerate(images):
        pixels[i, :, : image.shape[1], : image.shape[2]] = image
        mask[i, : image.shape[1], : image.shape[2]] = True
    return pixels, mask


def pad_index(rows: list[list[int]]) -> torch.Tensor:
    """Ragged lists of indices as a (B, K) tensor padded with -1."""
    index = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        index[i, : len(row)] = torch.tensor(row)
    return index


def first_rows(batch: dict, count: int) -> dict:
    """The batch's first ``count`` examples. Images they show from later rows (few-shot demonstrations) come
    along after their own, with ``image_index`` renumbered, so pixel row i stays example i's image."""
    rows = {key: value[:count] if isinstance(value, (torch.Tensor, list)) else value for key, value in batch.items()}
    if "image_index" not in batch:
        return rows
    index = rows["image_index"]
    later = sorted(set(index[index >= count].tolist()))
    renumber = torch.arange(len(batch["pixel_values"]), device=index.device)
    renumber[later] = torch.arange(count, count + len(later), device=index.device)
    rows["pixel_values"] = torch.cat([rows["pixel_values"], batch["pixel_values"][later]])
    if "pixel_mask" in batch:
        rows["pixel_mask"] = torch.cat([rows["pixel_mask"], batch["pixel_mask"][later]])
    rows["image_index"] = torch.where(index >= 0, renumber[index.clamp_min(0)], index)
    return rows
