"""Flamingo (Alayrac et al., 2022): a frozen language model reads the image through gated cross-attention.

A Perceiver resampler turns the image encoder's tokens into a few visual tokens; before every `every`-th decoder
layer of the LM, a GATED XATTN-DENSE block lets the text attend to them and adds the result through tanh gates
initialised at 0, so training starts from the LM exactly as it was. A text token attends only to the most recent
image before it (`media_attention_mask`); with one image per sample ahead of the text, that is the sample's image.

The blocks run as forward pre-hooks of the LM's decoder layers rather than wrappers around them: the LM keeps its
module tree (checkpoint keys, LoRA targets), and the blocks stay outside it, so freezing the LM leaves them free.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_vlm.adapters import Adapter, PerceiverResampler
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.visual_prompt import VisualPromptLM


def media_attention_mask(text_image_index: Tensor, media_image_index: Tensor) -> Tensor:
    """(B, T, M) bool, True where text token t may attend visual token m: m belongs to the most recent image before
    t. ``text_image_index`` (B, T): that image's index for each text token (-1 before any image);
    ``media_image_index`` (B, M): the image each visual token comes from."""
    return text_image_index[:, :, None] == media_image_index[:, None, :]


class GatedCrossAttentionBlock(nn.Module):
    """Text attends to the visual tokens, then a feed-forward; each added through tanh(gate), gates starting at 0."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.attention_gate = nn.Parameter(torch.zeros(1))
        self.feed_forward = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                          nn.Linear(4 * width, width))
        self.feed_forward_gate = nn.Parameter(torch.zeros(1))

    def forward(self, text: Tensor, media: Tensor, mask: Tensor) -> Tensor:
        """text (B, T, D), media (B, M, D), mask (B, T, M) True = may attend; a token with no image before it
        takes nothing from the attention."""
        blocked = (~mask).repeat_interleave(self.attention.num_heads, dim=0)
        attended = self.attention(self.norm(text), media, media, attn_mask=blocked, need_weights=False)[0]
        attended = attended.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        text = text + self.attention_gate.tanh() * attended
        return text + self.feed_forward_gate.tanh() * self.feed_forward(text)


class Flamingo(VisualPromptLM):
    """Image encoder -> Perceiver resampler -> gated cross-attention into the LM every `every` layers."""

    def __init__(self, vision: VisionEncoder, language_model: LanguageModel, resampler: Adapter | None = None,
                 every: int = 1, num_heads: int = 4) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.resampler = (resampler or PerceiverResampler()).build(vision.width, language_model.width)
        layers = language_model.model.get_decoder().layers
        self.layer_indices = list(range(0, len(layers), every))
        self.cross_attention = nn.ModuleList(
            GatedCrossAttentionBlock(language_model.width, num_heads) for _ in self.layer_indices)
        self._media: Tensor | None = None
        for index, block in zip(self.layer_indices, self.cross_attention):
            layers[index].register_forward_pre_hook(self._hook(block), with_kwargs=True)

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm): the resampled visual tokens the text attends to."""
        return self.resampler(self.vision(pixel_values).patch_tokens)

    def lm_loss(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Next-token loss on the labelled tokens of the text alone, which reads the image by cross-attention."""
        with self.conditioned_on(self.visual_prompt(pixel_values)):
            return self.language_model.loss(self.language_model.embed(input_ids), attention_mask, labels)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, **generation) -> Tensor:
        """New token ids continuing the left-padded prompts, every decoding step conditioned on the image."""
        with self.conditioned_on(self.visual_prompt(pixel_values)):
            return self.language_model.generate(self.language_model.embed(prompt_ids), prompt_mask, **generation)

    @contextmanager
    def conditioned_on(self, media: Tensor) -> Iterator[None]:
        """The LM's forwards inside read `media` (B, M, D) through the gated blocks."""
        self._media = media
        try:
            yield
        finally:
            self._media = None

    def _hook(self, block: GatedCrossAttentionBlock):
        def before_layer(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self._media is None:
                return args, kwargs
            hidden = args[0] if args else kwargs["hidden_states"]
            media = self._media
            if hidden.shape[0] != media.shape[0]:  # beam search repeats each sample num_beams times
                media = media.repeat_interleave(hidden.shape[0] // media.shape[0], dim=0)
            # one image per sample, ahead of the text: every text token's most recent image is image 0
            text_image = hidden.new_zeros(hidden.shape[:2], dtype=torch.long)
            media_image = media.new_zeros(media.shape[:2], dtype=torch.long)
            hidden = block(hidden, media.to(hidden.dtype), media_attention_mask(text_image, media_image))
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return before_layer

    def layer_groups(self) -> dict[str, nn.Module]:
        """Named parts for staged freezing."""
        return {"vision": self.vision, "resampler": self.resampler, "cross_attention": self.cross_attention,
                "language_model": self.language_model}
