"""LLaVA (Liu et al., 2023): the image encoder's patch tokens, projected, are the LM's visual prompt.

By default no resampler: every patch token of the vision encoder becomes one LM token through a two-layer GELU
MLP (LLaVA-1.5; `Linear` for LLaVA-1); any `Adapter` (Perceiver resampler, pixel shuffle, pooling) takes its
place from the recipe. Training runs in two stages: the projector alone aligns the image tokens
with the frozen LM's embeddings, then the LM (fully or through LoRA) learns to follow image prompts; the
staged-freezing plan sets both in one fit.

Images at their own size (the DataModule's ``keep_aspect``): raw patches read them as they are (Fuyu), AnyRes reads
any encoder's tiles (LLaVA-NeXT); ``image_newline`` ends each row of an image's tokens with a learned embedding,
so the LM sees the 2-D layout. Each image then gives its own number of tokens, and batch padding gives none.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_vlm.adapters import MLP, Adapter
from lightning_vlm.encoders import RawPatches, VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.anyres import AnyRes
from lightning_vlm.models.visual_prompt import VisualPromptLM, grid_layout


class LLaVA(VisualPromptLM):
    """Image encoder -> adapter ("projector", built here for the two widths) -> language model, the adapted
    tokens placed where the text's image placeholder stands. ``image_newline``: a learned LM embedding after each row
    of an image's tokens (Fuyu, LLaVA-NeXT); ``anyres``: the image read as tiles and an overview (LLaVA-NeXT)."""

    def __init__(self, vision: VisionEncoder | RawPatches, language_model: LanguageModel,
                 adapter: Adapter | None = None, image_newline: bool = False, anyres: AnyRes | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        self.projector = (adapter or MLP()).build(vision.width, language_model.width)
        self.image_newline = nn.Parameter(torch.randn(language_model.width) * 0.02) if image_newline else None
        self.anyres = anyres

    def visual_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm): the adapter's tokens from the image encoder's patch tokens (each image's own
        first, zeros after them, where images give different numbers: `image_tokens`)."""
        return self.image_tokens(pixel_values)[0]

    def image_tokens(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """The visual prompts and how many tokens of each are the image's own (None: all)."""
        if self.anyres is not None:
            return self.anyres(pixel_values, self.projected, self.image_newline)
        features = self.vision(pixel_values)
        tokens = self.projector(features.patch_tokens)
        if self.image_newline is None and features.valid is None:
            return tokens, None
        return grid_layout(tokens, features.grid, features.valid, self.image_newline)

    def projected(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, M, D_lm) the adapter's tokens of every patch token (what AnyRes makes of each tile)."""
        return self.projector(self.vision(pixel_values).patch_tokens)
