"""PaliGemma's prefix-LM (Beyer et al., 2024): the image tokens and the prompt form a prefix that attends to itself
in both directions; the answer (the suffix) is decoded causally and alone carries the loss. The image tokens take
either one position each (sequential) or one shared position for the whole image.

Generation is written by hand (greedy or sampling, with transformers' logits warpers): transformers' `generate`
builds causal masks for its prefill from a 2D mask, and a prepared 4D prefix mask cannot be passed through it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from lightning_vlm.adapters import Adapter
from lightning_vlm.encoders import RawPatches, VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel, NextTokenOutput
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.models.visual_prompt import move_padding_left
from lightning_vlm.tokens import IGNORE_INDEX


def prefix_attention_mask(padding: Tensor, prefix_end: Tensor, bidirectional: bool = True) -> Tensor:
    """(B, L, L) bool, True where query q may attend key k: k is a real token (``padding`` 1) at or before q, or,
    with `bidirectional`, q and k both lie in the prefix (positions below ``prefix_end``, (B,)). Every query sees
    itself, so a padded row never attends to nothing."""
    length = padding.shape[1]
    index = torch.arange(length, device=padding.device)
    allowed = (index[None, :] <= index[:, None]).unsqueeze(0)  # causal: key at or before query
    if bidirectional:
        in_prefix = index[None, :] < prefix_end[:, None]  # (B, L)
        allowed = allowed | (in_prefix[:, :, None] & in_prefix[:, None, :])
    allowed = allowed & padding.bool()[:, None, :]
    return allowed | torch.eye(length, dtype=torch.bool, device=padding.device)


def position_ids(padding: Tensor, image_slot: Tensor, shared_image_position: bool) -> Tensor:
    """(B, L) positions counting real tokens from 0 (padding repeats its neighbour's); with
    `shared_image_position` every token of an image takes the position of its first (``image_slot`` 0)."""
    steps = padding.long()
    if shared_image_position:
        steps = steps.masked_fill(image_slot > 0, 0)
    return (steps.cumsum(dim=1) - 1).clamp_min(0)


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B, L_q, L_k) bool mask as the (B, 1, L_q, L_k) additive float mask transformers' attention adds."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min).unsqueeze(1)


class PrefixLM(LLaVA):
    """Image encoder -> adapter -> language model, as LLaVA, with PaliGemma's prefix-LM attention.

    ``prefix_attention``: "bidirectional" (PaliGemma) or "causal" (then it trains as LLaVA does);
    ``image_positions``: "sequential" or "shared" (one position id for all of an image's tokens).
    """

    def __init__(self, vision: VisionEncoder | RawPatches, language_model: LanguageModel,
                 adapter: Adapter | None = None,
                 prefix_attention: Literal["bidirectional", "causal"] = "bidirectional",
                 image_positions: Literal["sequential", "shared"] = "sequential") -> None:
        super().__init__(vision, language_model, adapter)
        if prefix_attention not in ("bidirectional", "causal") or image_positions not in ("sequential", "shared"):
            raise ValueError(f"prefix_attention must be bidirectional|causal and image_positions sequential|shared, "
                             f"got {prefix_attention!r}, {image_positions!r}")
        self.bidirectional = prefix_attention == "bidirectional"
        self.shared_image_position = image_positions == "shared"

    def predict_text(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     image_index: Tensor | None = None) -> NextTokenOutput:
        """The LM's predictions of the labelled suffix; the prefix is everything before the first label (the images and
        the prompt; a chat's later turns and a few-shot example's demonstrations too)."""
        sequence = self.interleave(pixel_values, input_ids, attention_mask, image_index, labels)
        labelled = sequence.labels != IGNORE_INDEX
        prefix_end = torch.where(labelled.any(1), labelled.float().argmax(1), sequence.mask.sum(1))
        mask = prefix_attention_mask(sequence.mask, prefix_end, self.bidirectional)
        return self.language_model(sequence.embeds, additive(mask, self.language_model.dtype), sequence.labels,
                                   position_ids(sequence.mask, sequence.image_slot, self.shared_image_position))

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, image_index: Tensor | None = None,
                 max_new_tokens: int = 24, num_beams: int = 1, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0) -> Tensor:
        """New token ids (B, <= max_new_tokens) continuing the left-padded prompts with their images placed: the
        whole input is the prefix; new tokens attend causally. Greedy, or sampling with temperature and top-p."""
        if num_beams != 1:
            raise ValueError("PrefixLM decodes greedily or by sampling; beam search is not supported")
        lm, tok = self.language_model.model, self.language_model.tokenizer
        sequence = self.interleave(pixel_values, prompt_ids, prompt_mask, image_index)
        embeds, padding, image_slot = move_padding_left(sequence.embeds, sequence.mask, sequence.image_slot)
        embeds = embeds.to(self.language_model.dtype)
        mask = prefix_attention_mask(padding, padding.new_full(padding.shape[:1], padding.shape[1]), self.bidirectional)
        positions = position_ids(padding, image_slot, self.shared_image_position)
        out = lm(inputs_embeds=embeds, attention_mask=additive(mask, embeds.dtype), position_ids=positions,
                 use_cache=True, logits_to_keep=1)  # the prefill needs the last position's logits only
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
                                      if do_sample else [])
        new, done = [], torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
        for _ in range(max_new_tokens):
            scores = warpers(None, out.logits[:, -1].float())
            token = (torch.multinomial(scores.softmax(-1), 1).squeeze(1) if do_sample else scores.argmax(-1))
            token = token.masked_fill(done, tok.pad_token_id)
            new.append(token)
            done |= token == tok.eos_token_id
            if done.all():
                break
            padding = torch.cat([padding, padding.new_ones(len(padding), 1)], dim=1)
            positions = positions[:, -1:] + 1
            step_mask = additive(padding.bool()[:, None, :], embeds.dtype)
            out = lm(inputs_embeds=self.language_model.embed(token[:, None]), attention_mask=step_mask,
                     position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
        return torch.stack(new, dim=1)
