"""Contrastive losses: CLIP's symmetric InfoNCE, SigLIP's pairwise sigmoid loss, and Llip's use of the latter.

Every function computes this rank's rows against columns gathered from all ranks (gradients kept), so the
mean over ranks of the per-rank loss equals the loss of one process on the global batch. Hard-negative
captions (NegCLIP, Yuksekgonul et al., 2023) join as extra text columns after the captions: negatives for
the images only, since a negative caption has no image of its own; padded slots are masked out.

Captions repeat in real data and often in synthetic data: given caption keys (`caption_keys`), a column whose
caption is identical to a row's own caption (another pair's copy, or another pair's hard negative that happens
to spell it) is left out of that row's loss, neither negative nor extra positive. On the embedded benchmark
5-15 % of a batch's images would otherwise be told that their exact caption does not describe them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_vlm.distributed import gather_with_grad, rank_offset
from lightning_vlm.losses.output import LossOutput, WeightedLoss
from lightning_vlm.models.contrastive import ContrastiveOutput, LlipOutput
from lightning_vlm.models.similarity import cosine_matrix, scale_logits, temperature, text_columns


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    negative_emb: Tensor | None = None,
    negative_valid: Tensor | None = None,
    text_keys: Tensor | None = None,
    negative_keys: Tensor | None = None,
) -> Tensor:
    """CLIP's symmetric cross-entropy over normalised (n, D) embeddings; open_clip's local_loss + gather_with_grad.

    Hard negatives widen the image-to-text softmax only (NegCLIP). With caption keys, the images of a caption's
    copies leave its text-to-image softmax as its copies leave the image's.
    """
    n = image_emb.shape[0]
    labels = torch.arange(n, device=image_emb.device) + rank_offset(n)
    columns, valid = text_columns(text_emb, negative_emb, negative_valid, text_keys, negative_keys)
    logits_per_image = scale_logits(cosine_matrix(image_emb, columns), logit_scale)
    logits_per_text = scale_logits(cosine_matrix(text_emb, gather_with_grad(image_emb)), logit_scale)
    if valid is not None:  # the caption columns' mask is symmetric: copies of caption i <-> their images
        logits_per_image = logits_per_image.masked_fill(~valid, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(~valid[:, : logits_per_text.shape[1]], float("-inf"))
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def sigmoid_pair_loss(logits: Tensor, positive_offset: int, valid: Tensor | None = None) -> Tensor:
    """SigLIP's loss on (n_local, n_columns) pair logits whose positives sit at (i, positive_offset + i).

    -sum_ij log sigmoid(z_ij * logits_ij) / n_local, with z = +1 for positives and -1 otherwise; pairs with
    ``valid`` False (copies of the row's caption; any mask broadcasting to the logits) count nothing.
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
    text_keys: Tensor | None = None,
    negative_keys: Tensor | None = None,
) -> Tensor:
    """SigLIP: local images against all gathered texts (and hard negatives) in one all_gather.

    The paper's chunked ring exchange of text shards gives the same value with less peak memory; not needed here.
    """
    columns, valid = text_columns(text_emb, negative_emb, negative_valid, text_keys, negative_keys)
    logits = scale_logits(cosine_matrix(image_emb, columns), logit_scale, logit_bias)
    return sigmoid_pair_loss(logits, rank_offset(image_emb.shape[0]), valid)


def _scale_stats(logit_scale: Tensor, logit_bias: Tensor | None) -> dict[str, Tensor]:
    """Detached t = exp(clamped logit_scale) and bias, for logging."""
    stats = {"logit_scale": temperature(logit_scale.detach())}
    if logit_bias is not None:
        stats["logit_bias"] = logit_bias.detach()
    return stats


class CLIPLoss(WeightedLoss):
    """CLIP (Radford et al., 2021): symmetric InfoNCE with a learnable temperature; term "itc"."""

    term_names = ("itc",)

    def forward(self, out: ContrastiveOutput) -> LossOutput:
        loss = clip_loss(out.image_emb, out.text_emb, out.logit_scale, out.negative_emb, out.negative_valid,
                         out.text_keys, out.negative_keys)
        return self.weigh({"itc": loss}, _scale_stats(out.logit_scale, None))


class SigLIPLoss(WeightedLoss):
    """SigLIP (Zhai et al., 2023): pairwise sigmoid loss with learnable temperature and bias; term "sigmoid"."""

    term_names = ("sigmoid",)

    def forward(self, out: ContrastiveOutput) -> LossOutput:
        if out.logit_bias is None:
            raise ValueError("SigLIPLoss needs a model with logit_bias (e.g. DualEncoder(logit_bias_init=-10))")
        loss = siglip_loss(
            out.image_emb, out.text_emb, out.logit_scale, out.logit_bias, out.negative_emb, out.negative_valid,
            out.text_keys, out.negative_keys,
        )
        return self.weigh({"sigmoid": loss}, _scale_stats(out.logit_scale, out.logit_bias))


class LlipLoss(WeightedLoss):
    """Llip (Lavoie et al., 2024): sigmoid loss on caption-conditioned image-caption logits; term "sigmoid"; stats
    also the mixing weights' normalised entropy (`Llip.mixture_entropy`). With `Llip(uniform_anchor=True)` the same
    loss on the caption-independent logits is term "anchor"."""

    term_names = ("sigmoid", "anchor")

    def forward(self, out: LlipOutput) -> LossOutput:
        offset = rank_offset(out.logits.shape[0])
        terms = {"sigmoid": sigmoid_pair_loss(out.logits, offset, out.column_valid)}
        if out.anchor_logits is not None:
            terms["anchor"] = sigmoid_pair_loss(out.anchor_logits, offset, out.column_valid)
        stats = _scale_stats(out.logit_scale, out.logit_bias)
        if out.mixture_entropy is not None:
            stats["mixture_entropy"] = out.mixture_entropy
        return self.weigh(terms, stats)
