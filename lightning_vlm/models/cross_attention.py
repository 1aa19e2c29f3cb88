"""Cross-attention from a transformers language model's text to image tokens, inserted before chosen decoder layers.

The blocks run as forward pre-hooks of the LM's decoder layers rather than wrappers around them: the LM keeps its
module tree (checkpoint keys, LoRA targets), and the blocks stay outside it, so freezing the LM leaves them free.
Flamingo gates them (tanh gates at 0: the LM starts exactly as it was); CoCa's multimodal layers do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.visual_prompt import VisualPromptLM


def media_attention_mask(text_image_index: Tensor, media_image_index: Tensor) -> Tensor:
    """(B, T, M) bool, True where text token t may attend visual token m: m belongs to the most recent image before
    t. ``text_image_index`` (B, T): that image's index for each text token (-1 before any image);
    ``media_image_index`` (B, M): the image each visual token comes from."""
    return text_image_index[:, :, None] == media_image_index[:, None, :]


class CrossAttentionBlock(nn.Module):
    """Text attends to the visual tokens, then a feed-forward; with `gated`, each is added through tanh(gate), the
    gates starting at 0 (Flamingo's GATED XATTN-DENSE)."""

    def __init__(self, width: int, num_heads: int, gated: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.feed_forward = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                          nn.Linear(4 * width, width))
        self.attention_gate = nn.Parameter(torch.zeros(1)) if gated else None
        self.feed_forward_gate = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, text: Tensor, media: Tensor, mask: Tensor) -> Tensor:
        """text (B, T, D), media (B, M, D), mask (B, T, M) True = may attend; a token with no image before it
        takes nothing from the attention."""
        blocked = (~mask).repeat_interleave(self.attention.num_heads, dim=0)
        attended = self.attention(self.norm(text), media, media, attn_mask=blocked, need_weights=False)[0]
        attended = attended.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        text = text + self._gate(self.attention_gate) * attended
        return text + self._gate(self.feed_forward_gate) * self.feed_forward(text)

    @staticmethod
    def _gate(gate: nn.Parameter | None) -> Tensor | float:
        return 1.0 if gate is None else gate.tanh()


class MediaCrossAttention(nn.Module):
    """`CrossAttentionBlock`s before the LM's decoder layers `layer_indices`; every LM forward inside
    `conditioned_on(media)` reads the (B, M, D_lm) media through them, and outside it the LM runs as it is.

    One image per sample, ahead of the text: every text token's most recent image is image 0 (the mask function
    above handles interleaved images; the data side does not make them yet).
    """

    def __init__(self, language_model: LanguageModel, layer_indices: list[int], num_heads: int,
                 gated: bool = True) -> None:
        super().__init__()
        layers = language_model.model.get_decoder().layers
        self.layer_indices = list(layer_indices)
        self.blocks = nn.ModuleList(CrossAttentionBlock(language_model.width, num_heads, gated)
                                    for _ in self.layer_indices)
        self.media: Tensor | None = None
        for index, block in zip(self.layer_indices, self.blocks):
            layers[index].register_forward_pre_hook(self._hook(block), with_kwargs=True)

    @contextmanager
    def conditioned_on(self, media: Tensor) -> Iterator[None]:
        """The LM's forwards inside read `media` (B, M, D) through the blocks."""
        self.media = media
        try:
            yield
        finally:
            self.media = None

    def _hook(self, block: CrossAttentionBlock):
        def before_layer(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self.media is None:
                return args, kwargs
            hidden = args[0] if args else kwargs["hidden_states"]
            media = self.media
            if hidden.shape[0] != media.shape[0]:  # beam search repeats each sample num_beams times
                media = media.repeat_interleave(hidden.shape[0] // media.shape[0], dim=0)
            text_image = hidden.new_zeros(hidden.shape[:2], dtype=torch.long)
            media_image = media.new_zeros(media.shape[:2], dtype=torch.long)
            hidden = block(hidden, media.to(hidden.dtype), media_attention_mask(text_image, media_image))
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return before_layer


class CrossAttentionLM(VisualPromptLM):
    """A language model that reads the visual prompt through `cross_attention` (a `MediaCrossAttention`) rather
    than as prefix tokens: the text alone is its input (Flamingo, CoCa's multimodal layers)."""

    cross_attention: MediaCrossAttention

    def lm_loss(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Next-token loss on the labelled tokens of the text, which reads the image by cross-attention."""
        return self.text_loss(self.visual_prompt(pixel_values), input_ids, attention_mask, labels)

    def text_loss(self, media: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """`lm_loss` from visual tokens already made (B, M, D_lm)."""
        with self.cross_attention.conditioned_on(media):
            return self.language_model.loss(self.language_model.embed(input_ids), attention_mask, labels)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, **generation) -> Tensor:
        """New token ids continuing the left-padded prompts, every decoding step conditioned on the image."""
        with self.cross_attention.conditioned_on(self.visual_prompt(pixel_values)):
            return self.language_model.generate(self.language_model.embed(prompt_ids), prompt_mask, **generation)
