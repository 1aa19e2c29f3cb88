"""Contrastive losses: CLIP's symmetric InfoNCE, SigLIP's pairwise sigmoid loss, and Llip's use of the latter.

Every function computes this rank's rows against columns gathered from all ranks (gradients kept), so the
mean over ranks of the per-rank loss equals the loss of one process on the global batch. Hard-negative
captions (NegCLIP, Yuksekgonul et al., 2023) join as extra text columns after the captions: negatives for
the images only, since a negative caption has no image of its own; padded slots are masked out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vlm.losses.distributed import gather_with_grad, rank_offset
from lightning_vlm.losses.output import LossOutput

if TYPE_CHECKING:
    from lightning_vlm.models.contrastive import ContrastiveOutput, LlipOutput

LOGIT_SCALE_MAX = math.log(100.0)


def scale_logits(cosine: Tensor, logit_scale: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """t * cosine + b with t = exp(logit_scale clamped to [0, ln 100]).

    The clamp happens here, in the forward pass (the parameter itself is never modified); at the bound the
    scale gets no gradient, which caps the temperature as CLIP does.
    """
    logits = temperature(logit_scale) * cosine
    return logits if logit_bias is None else logits + logit_bias


def temperature(logit_scale: Tensor) -> Tensor:
    """The multiplier t = exp(logit_scale), the log-scale clamped to [0, ln 100]."""
    return logit_scale.clamp(0.0, LOGIT_SCALE_MAX).exp()


def text_columns(
    text_emb: Tensor, negative_emb: Tensor | None = None, negative_valid: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Every rank's captions, then every rank's hard negatives (gathered with gradients), and which of these
    columns are real: None when there are no negatives, else a bool mask over all columns."""
    columns = gather_with_grad(text_emb)
    if negative_emb is None:
        return columns, None
    if negative_valid is None:
        negative_valid = torch.ones(negative_emb.shape[0], dtype=torch.bool, device=negative_emb.device)
    valid = gather_with_grad(negative_valid.to(negative_emb.dtype)) > 0.5  # float: gloo gathers no bools
    valid = torch.cat([torch.ones(columns.shape[0], dtype=torch.bool, device=valid.device), valid])
    return torch.cat([columns, gather_with_grad(negative_emb)]), valid


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    negative_emb: Tensor | None = None,
    negative_valid: Tensor | None = None,
) -> Tensor:
    """CLIP's symmetric cross-entropy over normalised (n, D) embeddings; open_clip's local_loss + gather_with_grad.

    Hard negatives widen the image-to-text softmax only (NegCLIP).
    """
    n = image_emb.shape[0]
    labels = torch.arange(n, device=image_emb.device) + rank_offset(n)
    columns, valid = text_columns(text_emb, negative_emb, negative_valid)
    logits_per_image = scale_logits(image_emb @ columns.T, logit_scale)
    if valid is not None:
        logits_per_image = logits_per_image.masked_fill(~valid, float("-inf"))
    logits_per_text = scale_logits(text_emb @ gather_with_grad(image_emb).T, logit_scale)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def sigmoid_pair_loss(logits: Tensor, positive_offset: int, valid: Tensor | None = None) -> Tensor:
    """SigLIP's loss on (n_local, n_columns) pair logits whose positives sit at (i, positive_offset + i).

    -sum_ij log sigmoid(z_ij * logits_ij) / n_local, with z = +1 for positives and -1 otherwise; columns
    with ``valid`` False (padded hard negatives) count nothing.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    signs = torch.full_like(logits, -1.0)
    signs[rows, rows + positive_offset] = 1.0
    pair_losses = -F.logsigmoid(signs * logits)
    if valid is not None:
        pair_losses = pair_losses * valid
    return pair_losses.sum() / logits.shape[0]


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    negative_emb: Tensor | None = None,
    negative_valid: Tensor | None = None,
) -> Tensor:
    """SigLIP: local images against all gathered texts (and hard negatives) in one all_gather.

    The paper's chunked ring exchange of text shards gives the same value with less peak memory; not needed here.
    """
    columns, valid = text_columns(text_emb, negative_emb, negative_valid)
    logits = scale_logits(image_emb @ columns.T, logit_scale, logit_bias)
    return sigmoid_pair_loss(logits, rank_offset(image_emb.shape[0]), valid)


def _scale_stats(logit_scale: Tensor, logit_bias: Tensor | None) -> dict[str, Tensor]:
    """Detached t = exp(clamped logit_scale) and bias, for logging."""
    stats = {"logit_scale": temperature(logit_scale.detach())}
    if logit_bias is not None:
        stats["logit_bias"] = logit_bias.detach()
    return stats


class CLIPLoss(nn.Module):
    """CLIP (Radford et al., 2021): symmetric InfoNCE with a learnable temperature; term "itc"."""

    def forward(self, out: ContrastiveOutput) -> LossOutput:
        loss = clip_loss(out.image_emb, out.text_emb, out.logit_scale, out.negative_emb, out.negative_valid)
        return LossOutput.from_terms({"itc": loss}, _scale_stats(out.logit_scale, None))


class SigLIPLoss(nn.Module):
    """SigLIP (Zhai et al., 2023): pairwise sigmoid loss with learnable temperature and bias; term "sigmoid"."""

    def forward(self, out: ContrastiveOutput) -> LossOutput:
        if out.logit_bias is None:
            raise ValueError("SigLIPLoss needs a model with logit_bias (e.g. DualEncoder(logit_bias_init=-10))")
        loss = siglip_loss(
            out.image_emb, out.text_emb, out.logit_scale, out.logit_bias, out.negative_emb, out.negative_valid
        )
        return LossOutput.from_terms({"sigmoid": loss}, _scale_stats(out.logit_scale, out.logit_bias))


class LlipLoss(nn.Module):
    """Llip (Lavoie et al., 2024): sigmoid loss on caption-conditioned image-caption logits; term "sigmoid"."""

    def forward(self, out: LlipOutput) -> LossOutput:
        loss = sigmoid_pair_loss(out.logits, rank_offset(out.logits.shape[0]), out.column_valid)
        return LossOutput.from_terms({"sigmoid": loss}, _scale_stats(out.logit_scale, out.logit_bias))
