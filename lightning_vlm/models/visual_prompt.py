"""A language model prompted by an image: projected visual tokens prepended to the text as a soft prompt.

Shared by every model that feeds images to a decoder-only LM this way (BLIP-2 stage 2, LLaVA): a subclass
says how it makes the visual prompt (`visual_prompt`), this class trains and decodes with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from lightning_vlm.encoders.lm import LanguageModel


class VisualPromptLM(nn.Module, ABC):
    """Next-token loss and generation for ``[visual prompt] text``; subclasses set `language_model` and define
    `visual_prompt`."""

    language_model: LanguageModel | None

    @abstractmethod
    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm) the image as M soft tokens of the LM's embedding width."""

    def lm_loss(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Next-token loss on the labelled (target) tokens, the visual prompt prepended to the text."""
        prompt = self.visual_prompt(pixel_values)
        embeds = torch.cat([prompt, self.language_model.embed(input_ids)], dim=1)
        ones = attention_mask.new_ones(prompt.shape[:2])
        no_labels = labels.new_full(prompt.shape[:2], -100)
        return self.language_model.loss(embeds, torch.cat([ones, attention_mask], 1), torch.cat([no_labels, labels], 1))

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, **generation) -> Tensor:
        """New LM token ids continuing ``[visual prompt] prompt`` for left-padded prompts (B, L)."""
        visual = self.visual_prompt(pixel_values)
        embeds = torch.cat([visual, self.language_model.embed(prompt_ids)], dim=1)
        mask = torch.cat([prompt_mask.new_ones(visual.shape[:2]), prompt_mask], dim=1)
        if (prompt_mask[:, 0] == 0).any():  # left padding must come before the image, not between it and text
            embeds, mask = move_padding_left(embeds, mask)
        return self.language_model.generate(embeds, mask, **generation)


def move_padding_left(embeds: Tensor, mask: Tensor, *aligned: Tensor) -> tuple[Tensor, ...]:
    """Reorder each row so its padded positions come first, keeping the order of the real ones; `aligned` (B, L)
    tensors (which positions are image tokens, ...) are reordered alike."""
    order = torch.argsort(mask, dim=1, stable=True)  # zeros (padding) first
    return (embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order),
            *(tensor.gather(1, order) for tensor in aligned))
