"""Masked vision-language pretraining: FLAVA and MaskVLM. The recipe picks the model; `MaskedModelingLoss` weighs
its named terms (mlm, mim, mmm_text, mmm_image, itm, itc). Both keep a dual encoder's ITC heads, so the shared
retrieval / zero-shot / binding evaluation of the contrastive family runs on every val split unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_vlm.models.contrastive import HardNegatives
from lightning_vlm.models.masked import MaskedModelingOutput
from lightning_vlm.paradigms.contrastive import Contrastive


class MaskedPretraining(Contrastive):
    """Trains a masked model (`FLAVA`, `MaskVLM`) as `Contrastive` trains a dual encoder, on pair batches and, for
    FLAVA, image-only or text-only batches (sources with ``modality: image | text``), and shows what its masked
    image modelling recovers: `SampleImageLogger` draws `reconstructions` beside the originals."""

    def model_output(self, batch: dict[str, Any]) -> MaskedModelingOutput:
        return self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                          HardNegatives.from_batch(batch), modality=batch.get("modality", "pair"))

    @torch.no_grad()
    def reconstructions(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The batch's images with patches masked, and the model's reconstruction of them (normalised pixels)."""
        return self.model.reconstruct(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
