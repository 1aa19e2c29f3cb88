"""A language model prompted by images: each image's projected visual tokens stand where its placeholder stands.

Shared by every model that feeds images to a decoder-only LM as input tokens (BLIP-2 stage 2, LLaVA, PaliGemma's
prefix-LM, Fuyu): a subclass says how it makes the visual prompt (`visual_prompt`), this class places it in the
text, trains and decodes. The text marks each image with the LM's ``<image>`` token and ``image_index`` says
which image of the batch each placeholder shows (a few-shot sequence shows several); text without any
placeholder reads its own image ahead of it. Images may give different numbers of tokens (native resolution,
AnyRes): `image_tokens` then says how many of each image's tokens are its own, and only those are placed.
"""

from __future__ import annotations

import math
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
                 image_index: Tensor | None = None, labels: Tensor | None = None,
                 lengths: Tensor | None = None) -> Interleaved:
    """Each placeholder token of row b replaced by the M visual tokens of image ``image_index[b, k]`` (its k-th
    placeholder), the text around it moved along; rows end-padded to the longest.

    visual (N, M, D) for the batch's N images; text_embeds (B, L, D); ``lengths`` (N,): image n gives only its
    first ``lengths[n]`` tokens (None: all M). Written by hand: transformers' LLaVA expects the processor to have
    repeated each placeholder M times, which ties the data side to the adapter.
    """
    batch, length = input_ids.shape
    num_tokens = visual.shape[1]
    is_placeholder = input_ids == image_token_id
    if not is_placeholder.any():  # no image placed anywhere: each row reads its image first
        text_embeds, input_ids, attention_mask, labels = _placeholder_first(text_embeds, input_ids, attention_mask,
                                                                            labels, image_token_id)
        return place_images(visual, text_embeds, input_ids, attention_mask, image_token_id, image_index, labels,
                            lengths)
    if image_index is None:
        image_index = torch.arange(batch, device=input_ids.device)[:, None]
    number = image_numbers(input_ids, image_token_id)
    rows, positions = is_placeholder.nonzero(as_tuple=True)
    shown = image_index[rows, number[rows, positions].clamp_max(image_index.shape[1] - 1)]
    if (number[rows, positions] >= image_index.shape[1]).any() or (shown < 0).any():
        raise ValueError("the text has more image placeholders than image_index gives images")

    counts = lengths[shown] if lengths is not None else torch.full_like(shown, num_tokens)  # per placeholder
    grown = torch.zeros_like(input_ids)
    grown[rows, positions] = counts - 1
    start = torch.arange(length, device=input_ids.device) + grown.cumsum(1) - grown  # (B, L) new positions
    new_length = length + int(grown.sum(1).max())
    source = input_ids.new_zeros(batch, new_length)  # into [text tokens of all rows; visual tokens of all images]
    slot = input_ids.new_full((batch, new_length), -1)
    mask = attention_mask.new_zeros(batch, new_length)
    text_rows, text_positions = (~is_placeholder).nonzero(as_tuple=True)
    text_start = start[text_rows, text_positions]
    source[text_rows, text_start] = text_rows * length + text_positions
    mask[text_rows, text_start] = attention_mask[text_rows, text_positions]
    offsets = torch.arange(num_tokens, device=input_ids.device).expand(len(rows), -1)
    own = offsets < counts[:, None]  # (P, M): the tokens each placeholder stands for
    image_rows = rows[:, None].expand(-1, num_tokens)[own]
    image_slots = (start[rows, positions][:, None] + offsets)[own]
    source[image_rows, image_slots] = (batch * length + shown[:, None] * num_tokens + offsets)[own]
    slot[image_rows, image_slots] = offsets[own]
    mask[image_rows, image_slots] = attention_mask[rows, positions][:, None].expand(-1, num_tokens)[own]

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

    def image_tokens(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """The visual prompts (B, M, D_lm) and (B,) how many of each image's M tokens are its own, first (None: all
        M); a model whose images give different numbers of tokens (native resolution, AnyRes) says so here."""
        return self.visual_prompt(pixel_values), None

    def interleave(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                   image_index: Tensor | None = None, labels: Tensor | None = None) -> Interleaved:
        """The LM's input: the text's embeddings with every image's visual prompt placed (`place_images`)."""
        lm = self.language_model
        visual, lengths = self.image_tokens(pixel_values)
        return place_images(visual, lm.embed(input_ids), input_ids, attention_mask, lm.image_token_id, image_index,
                            labels, lengths)

    def predict_text(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     image_index: Tensor | None = None) -> NextTokenOutput:
        """The LM's predictions of the text with the images placed, for the next-token loss on its labels."""
        sequence = self.interleave(pixel_values, input_ids, attention_mask, image_index, labels)
        return self.language_model(sequence.embeds, sequence.mask, sequence.labels)

    def predict_language(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> NextTokenOutput:
        """The LM's predictions of text alone, no image read (a text-only batch: rehearsal against forgetting). Parts
        that read images by hooks (cross-attention, adaptation prompts, visual experts) act only while an image is
        given, so this is the LM as it is."""
        if self.language_model is None:
            raise ValueError(f"this {type(self).__name__} has no language_model to predict text with")
        lm = self.language_model
        return lm(lm.embed(input_ids), attention_mask, labels)

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


def grid_layout(tokens: Tensor, grid: tuple[int, int] | None = None, valid: Tensor | None = None,
                newline: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, N, D) tokens of a rows x columns grid in raster order (None: square) -> (B, M, D) each image's own tokens
    first, in raster order, with ``newline`` (D,) after each of its rows (Fuyu's and LLaVA-NeXT's image-newline), and
    (B,) how many are its own. ``valid`` (B, N): False on batch padding (an image's own tokens are a top-left block)."""
    batch, count, dim = tokens.shape
    rows, cols = grid or (math.isqrt(count),) * 2
    if rows * cols != count:
        raise ValueError(f"{count} image tokens are not a {rows}x{cols} grid: image newlines and padded images need "
                         "an adapter that keeps one token per patch (Linear, MLP)")
    tokens = tokens.view(batch, rows, cols, dim)
    valid = tokens.new_ones(batch, rows, cols, dtype=torch.bool) if valid is None else valid.view(batch, rows, cols)
    if newline is not None:  # a column of newlines, one per row of each image: its padding columns drop out below
        tokens = torch.cat([tokens, newline.to(tokens.dtype).expand(batch, rows, 1, dim)], dim=2)
        valid = torch.cat([valid, valid[:, :, :1]], dim=2)
    tokens, valid = tokens.flatten(1, 2), valid.flatten(1)
    lengths = valid.sum(dim=1)
    order = torch.argsort((~valid).long(), dim=1, stable=True)[:, : int(lengths.max())]
    own = torch.arange(order.shape[1], device=tokens.device) < lengths[:, None]
    return tokens.gather(1, order[..., None].expand(-1, -1, dim)) * own[..., None], lengths


def move_padding_left(embeds: Tensor, mask: Tensor, *aligned: Tensor) -> tuple[Tensor, ...]:
    """Reorder each row so its padded positions come first, keeping the order of the real ones; `aligned` (B, L)
    tensors (which positions are image tokens, ...) are reordered alike."""
    order = torch.argsort(mask, dim=1, stable=True)  # zeros (padding) first
    return (embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order),
            *(tensor.gather(1, order) for tensor in aligned))
