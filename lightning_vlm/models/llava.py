"""LLaVA (Liu et al., 2023): the image encoder's patch tokens, projected, are the LM's visual prompt.

No resampler: every token of the vision encoder becomes one LM token through a linear layer (LLaVA) or a
two-layer GELU MLP (LLaVA-1.5). Training runs in two stages: the projector alone aligns the image tokens
with the frozen LM's embeddings, then the LM (fully or through LoRA) learns to follow image prompts; the
staged-freezing plan sets both in one fit.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lightning_vlm.adapters.projection import make_projection
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.visual_prompt import VisualPromptLM


class LLaVA(VisualPromptLM):
    """Image encoder -> projector -> language model, the projected tokens prepended to the text."""

    def __init__(self, vision: VisionEncoder, language_model: LanguageModel,
                 projection: Literal["linear", "mlp"] = "mlp") -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.projector = make_projection(projection, vision.width, language_model.width)

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, D_lm): one soft token per image-encoder token."""
        return self.projector(self.vision(pixel_values).tokens)

    def layer_groups(self) -> dict[str, nn.Module]:
        """Named parts for staged freezing."""
        return {"vision": self.vision, "projector": self.projector, "language_model": self.language_model}
