"""Losses of the masked family (FLAVA, MaskVLM): masked token and patch prediction, image-text matching, and the
global contrastive term, each weighted and logged by name.

A masked prediction counts only where something was masked: cross-entropy at masked tokens (or at masked patches
when an image tokenizer gives codes), mean squared error over the masked patches' normalised pixels otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_vlm.losses.contrastive import CLIPLoss
from lightning_vlm.losses.output import LossOutput, WeightedLoss
from lightning_vlm.models.masked import MaskedModelingOutput, MaskedPrediction


def masked_prediction_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean loss over the positions where `mask` (B, N) is True: cross-entropy against class ids (B, N) for
    logits (B, N, V), squared error averaged over features for values (B, N, T). Zero (with a graph) when nothing
    is masked, e.g. MMM in a batch without a matched pair."""
    if not mask.any():
        return pred.sum() * 0.0
    if target.dtype == torch.long:
        return F.cross_entropy(pred[mask].float(), target[mask])
    return (pred[mask].float() - target[mask].float()).pow(2).mean()


def matching_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-text matching: 2-way cross-entropy of (N, 2) not-match / match logits against (N,) 0/1 labels."""
    return F.cross_entropy(logits.float(), labels)


class MaskedModelingLoss(WeightedLoss):
    """The weighted sum of a masked model's named terms: its masked predictions ("mlm", "mim", "mmm_text",
    "mmm_image"), "itm", and the contrastive loss's own terms ("itc" from CLIPLoss, or "sigmoid").

    A term weighted 0 is left out of the total. A unimodal batch (FLAVA's image-only or text-only sources) has only
    its own masked prediction.
    """

    masked_terms = ("mlm", "mim", "mmm_text", "mmm_image", "itm")

    def __init__(self, weights: dict[str, float] | None = None, contrastive: WeightedLoss | None = None) -> None:
        contrastive = contrastive if contrastive is not None else CLIPLoss()
        super().__init__(weights, self.masked_terms + contrastive.term_names)
        self.contrastive = contrastive

    def forward(self, out: MaskedModelingOutput) -> LossOutput:
        raw = {name: masked_prediction_loss(p.pred, p.target, p.mask) for name, p in out.predictions.items()}
        stats = masked_fractions(out.predictions)
        if out.contrastive is not None:  # raw terms: this loss weighs them, the contrastive loss's own weights stay 1
            contrastive = self.contrastive(out.contrastive)
            raw, stats = {**contrastive.terms, **raw}, {**contrastive.stats, **stats}
        if out.itm_logits is not None:
            raw["itm"] = matching_loss(out.itm_logits, out.itm_labels)
            stats["itm_accuracy"] = (out.itm_logits.argmax(-1) == out.itm_labels).float().mean().detach()
        return self.weigh(raw, stats)


def masked_fractions(predictions: dict[str, MaskedPrediction]) -> dict[str, Tensor]:
    """The fraction of positions each prediction is scored on, for the log (a silent masking bug shows here)."""
    return {f"{name}_masked": p.mask.float().mean().detach() for name, p in predictions.items()}
