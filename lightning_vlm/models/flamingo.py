"""Flamingo (Alayrac et al., 2022): a frozen language model reads the image through gated cross-attention.

A Perceiver resampler turns the image encoder's tokens into a few visual tokens; before every `every`-th decoder
layer of the LM, a GATED XATTN-DENSE block lets the text attend to them and adds the result through tanh gates
initialised at 0, so training starts from the LM exactly as it was. The text marks each image with ``<image>``; a
text token attends only to the visual tokens of the most recent image before it (`media_attention_mask`), so a
few-shot sequence of several images reads each answer's own image.
"""

from __future__ import annotations

from torch import Tensor

from lightning_vlm.adapters import Adapter, PerceiverResampler
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.cross_attention import CrossAttentionLM, MediaCrossAttention


class Flamingo(CrossAttentionLM):
    """Image encoder -> Perceiver resampler -> gated cross-attention into the LM every `every` layers."""

    def __init__(self, vision: VisionEncoder, language_model: LanguageModel, resampler: Adapter | None = None,
                 every: int = 1, num_heads: int = 4) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.resampler = (resampler or PerceiverResampler()).build(vision.width, language_model.width)
        num_layers = len(language_model.model.get_decoder().layers)
        self.cross_attention = MediaCrossAttention(language_model, range(0, num_layers, every), num_heads)

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm): the resampled visual tokens the text attends to."""
        return self.resampler(self.vision(pixel_values).patch_tokens)
