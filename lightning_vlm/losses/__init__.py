"""Losses: pure functions and thin parameter-free modules; distributed gathering lives here."""

from lightning_vlm.losses.contrastive import (
    CLIPLoss,
    LlipLoss,
    SigLIPLoss,
    caption_keys,
    clip_loss,
    scale_logits,
    sigmoid_pair_loss,
    siglip_loss,
)
from lightning_vlm.distributed import gather_with_grad, rank_offset
from lightning_vlm.losses.output import LossOutput

__all__ = [
    "CLIPLoss",
    "LlipLoss",
    "LossOutput",
    "SigLIPLoss",
    "caption_keys",
    "clip_loss",
    "gather_with_grad",
    "rank_offset",
    "scale_logits",
    "sigmoid_pair_loss",
    "siglip_loss",
]
