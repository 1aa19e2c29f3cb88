"""Masked vision-language pretraining: FLAVA and MaskVLM. The recipe picks the model; `MaskedModelingLoss` weighs
its named terms (mlm, mim, mmm_text, mmm_image, itm, itc). Both keep a dual encoder's ITC heads, so the shared
retrieval / zero-shot / binding evaluation of the contrastive family runs on every val split unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_vlm.paradigms.contrastive import Contrastive


class MaskedPretraining(Contrastive):
    """Trains a masked model (`FLAVA`, `MaskVLM`) as `Contrastive` trains a dual encoder, and shows what its masked
    image modelling recovers: `SampleImageLogger` draws `reconstructions` beside the originals."""

    @torch.no_grad()
    def reconstructions(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The batch's images with patches masked, and the model's reconstruction of them (normalised pixels)."""
        return self.model.reconstruct(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
