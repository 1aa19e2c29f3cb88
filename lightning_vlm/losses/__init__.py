"""Losses: pure functions and thin parameter-free modules that turn a model's output into named, weighted terms
(`LossOutput`); the one label shift lives in `language`."""

from lightning_vlm.losses.coca import CoCaLoss
from lightning_vlm.losses.contrastive import CLIPLoss, LlipLoss, SigLIPLoss, clip_loss, siglip_loss, sigmoid_pair_loss
from lightning_vlm.losses.language import NextTokenLoss, next_token_loss, shift_labels
from lightning_vlm.losses.masked import MaskedModelingLoss
from lightning_vlm.losses.output import LossOutput, WeightedLoss
from lightning_vlm.losses.qformer import BLIP2Loss, itc_loss

__all__ = [
    "BLIP2Loss",
    "CLIPLoss",
    "CoCaLoss",
    "LlipLoss",
    "LossOutput",
    "MaskedModelingLoss",
    "NextTokenLoss",
    "SigLIPLoss",
    "WeightedLoss",
    "clip_loss",
    "itc_loss",
    "next_token_loss",
    "shift_labels",
    "sigmoid_pair_loss",
    "siglip_loss",
]
