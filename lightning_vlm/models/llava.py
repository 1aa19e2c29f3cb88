"""LLaVA (Liu et al., 2023): the image encoder's patch tokens, projected, are the LM's visual prompt.

By default no resampler: every patch token of the vision encoder becomes one LM token through a two-layer GELU
MLP (LLaVA-1.5; `Linear` for LLaVA-1); any `Adapter` (Perceiver resampler, pixel shuffle, pooling) takes its
place from the recipe. Training runs in two stages: the projector alone aligns the image tokens
with the frozen LM's embeddings, then the LM (fully or through LoRA) learns to follow image prompts; the
staged-freezing plan sets both in one fit.
"""

from __future__ import annotations

from torch import Tensor

from lightning_vlm.adapters import MLP, Adapter
from lightning_vlm.encoders import RawPatches, VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.visual_prompt import VisualPromptLM


class LLaVA(VisualPromptLM):
    """Image encoder -> adapter ("projector", built here for the two widths) -> language model, the adapted
    tokens placed where the text's image placeholder stands."""

    def __init__(self, vision: VisionEncoder | RawPatches, language_model: LanguageModel,
                 adapter: Adapter | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.projector = (adapter or MLP()).build(vision.width, language_model.width)

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm): the adapter's tokens from the image encoder's patch tokens."""
        return self.projector(self.vision(pixel_values).patch_tokens)
