"""A language model prompted by images: each image's projected visual tokens stand where its placeholder stands.

Shared by every model that feeds images to a decoder-only LM as input tokens (BLIP-2 stage 2, LLaVA, PaliGemma's
prefix-LM, Fuyu): a subclass says how it makes the visual prompt (`visual_prompt`), this class places it in the
text, trains and decodes. The text marks each image with the LM's ``<image>`` token and ``image_index`` says
which image of the batch each placeholder shows (a few-shot sequence shows several); text without any
placeholder reads its own image ahead of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_vlm.encoders.lm import LanguageModel, NextTokenOutput
from lightning_vlm.tokens import IGNORE_INDEX


@dataclass
class Interleaved:
    """Text with images placed: embeddings (B, L', D), padding mask (B, L'), labels (B, L') with IGNORE_INDEX on image
    tokens (None when none were given), and ``image_slot`` (B, L'): each image token's index within its image,
    -1 on text."""

    embeds: Tensor
    mask: Tensor
    labels: Tensor | None
    image_slot: Tensor


def image_numbers(input_ids: Tensor, image_token_id: int) -> Tensor:
    """(B, L) the number of the most recent image placeholder at or before each token (-1 before the first)."""
    return (input_ids == image_token_id).long().cumsum(dim=1) - 1


def images_per_row(visual: Tensor, image_index: Tensor | None) -> Tensor:
    """(N, M, D) visual tokens of the batch's images -> (B, K, M, D) the images each row shows, in order (zeros
    where ``image_index`` is -1 padding); without an index, row b shows image b."""
    if image_index is None:
        return visual[:, None]
    return visual[image_index.clamp_min(0)] * (image_index >= 0)[..., None, None]


def place_images(visual: Tensor, text_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, image_token_id: int,
                 image_index: Tensor | None = None, labels: Tensor | None = None) -> Interleaved:
    """Each placeholder token of row b replaced by the M visual tokens of image ``image_index[b, k]`` (its k-th
    placeholder), the text around it moved along; rows end-padded to the longest.

    visual (N, M, D) for the batch's N images; text_embeds (B, L, D). Written by hand: transformers' LLaVA
    expects the processor to have repeated each placeholder M times, which ties the data side to the adapter.
    """
    batch, length = input_ids.shape
    num_tokens = visual.shape[1]
    is_placeholder = input_ids == image_token_id
    if not is_placeholder.any():  # no image placed anywhere: each row reads its image first
        text_embeds, input_ids, attention_mask, labels = _placeholder_first(text_embeds, input_ids, attention_mask,
                                                                            labels, image_token_id)
        return place_images(visual, text_embeds, input_ids, attention_mask, image_token_id, image_index, labels)
    if image_index is None:
        image_index = torch.arange(batch, device=input_ids.device)[:, None]
    number = image_numbers(input_ids, image_token_id)
    rows, positions = is_placeholder.nonzero(as_tuple=True)
    shown = image_index[rows, number[rows, positions].clamp_max(image_index.shape[1] - 1)]
    if (number[rows, positions] >= image_index.shape[1]).any() or (shown < 0).any():
        raise ValueError("the text has more image placeholders than image_index gives images")

    earlier = is_placeholder.long().cumsum(1) - is_placeholder.long()
    start = torch.arange(length, device=input_ids.device) + (num_tokens - 1) * earlier  # (B, L) new positions
    new_length = length + (num_tokens - 1) * int(is_placeholder.sum(1).max())
    source = input_ids.new_zeros(batch, new_length)  # into [text tokens of all rows; visual tokens of all images]
    slot = input_ids.new_full((batch, new_length), -1)
    mask = attention_mask.new_zeros(batch, new_length)
    text_rows, text_positions = (~is_placeholder).nonzero(as_tuple=True)
    text_start = start[text_rows, text_positions]
    source[text_rows, text_start] = text_rows * length + text_positions
    mask[text_rows, text_start] = attention_mask[text_rows, text_positions]
    offsets = torch.arange(num_tokens, device=input_ids.device)
    image_rows, image_slots = rows[:, None].expand(-1, num_tokens), start[rows, positions][:, None] + offsets
    source[image_rows, image_slots] = batch * length + shown[:, None] * num_tokens + offsets
    slot[image_rows, image_slots] = offsets
    mask[image_rows, image_slots] = attention_mask[rows, positions][:, None]

    table = torch.cat([text_embeds.flatten(0, 1), visual.to(text_embeds.dtype).flatten(0, 1)])
    placed_labels = None
    if labels is not None:
        placed_labels = labels.new_full((batch, new_length), IGNORE_INDEX)
        placed_labels[text_rows, text_start] = labels[text_rows, text_positions]
    return Interleaved(table[source], mask, placed_labels, slot)


def _placeholder_first(text_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None,
                       image_token_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The text with a placeholder column in front: (embeddings, ids, mask, labels)."""
    column = input_ids.new_full((len(input_ids), 1), image_token_id)
    return (torch.cat([torch.zeros_like(text_embeds[:, :1]), text_embeds], 1), torch.cat([column, input_ids], 1),
            torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], 1),
            None if labels is None else torch.cat([torch.full_like(column, IGNORE_INDEX), labels], 1))


class VisualPromptLM(nn.Module, ABC):
    """Next-token predictions and generation for text with images placed in it; subclasses set `language_model` and
    define `visual_prompt`. ``places_images``: whether the images stand in the text (False for a model that
    reads them by cross-attention only: then the data side writes no placeholder)."""

    language_model: LanguageModel | None
    places_images: bool = True

    @abstractmethod
    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm) the image as M soft tokens of the LM's embedding width."""

    def interleave(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                   image_index: Tensor | None = None, labels: Tensor | None = None) -> Interleaved:
        """The LM's input: the text's embeddings with every image's visual prompt placed (`place_images`)."""
        lm = self.language_model
        return place_images(self.visual_prompt(pixel_values), lm.embed(input_ids), input_ids, attention_mask,
                            lm.image_token_id, image_index, labels)

    def predict_text(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     image_index: Tensor | None = None) -> NextTokenOutput:
        """The LM's predictions of the text with the images placed, for the next-token loss on its labels."""
        sequence = self.interleave(pixel_values, input_ids, attention_mask, image_index, labels)
        return self.language_model(sequence.embeds, sequence.mask, sequence.labels)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                image_index: Tensor | None = None) -> NextTokenOutput:
        """What the paradigm trains: `predict_text` (a model with other objectives as well says so here)."""
        return self.predict_text(pixel_values, input_ids, attention_mask, labels, image_index)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor,
                 image_index: Tensor | None = None, **generation) -> Tensor:
        """New LM token ids continuing the left-padded prompts (B, L) with their images placed."""
        sequence = self.interleave(pixel_values, prompt_ids, prompt_mask, image_index)
        embeds, mask = move_padding_left(sequence.embeds, sequence.mask)  # rows with fewer images end early
        return self.language_model.generate(embeds, mask, **generation)


def move_padding_left(embeds: Tensor, mask: Tensor, *aligned: Tensor) -> tuple[Tensor, ...]:
    """Reorder each row so its padded positions come first, keeping the order of the real ones; `aligned` (B, L)
    tensors (which positions are image tokens, ...) are reordered alike."""
    order = torch.argsort(mask, dim=1, stable=True)  # zeros (padding) first
    return (embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order),
            *(tensor.gather(1, order) for tensor in aligned))
