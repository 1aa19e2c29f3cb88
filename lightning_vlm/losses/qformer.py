"""BLIP-2's losses (Li et al., 2023): stage 1's image-text contrastive with the max over queries, image-text
matching on the hard negatives the model mined, and image-grounded text generation; stage 2's next-token loss.

As in losses/contrastive.py, ITC scores this rank's rows against columns gathered from all ranks with
gradients. ITM's negatives were mined inside the local batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_vlm.distributed import gather_with_grad, rank_offset
from lightning_vlm.losses.language import Reduction, next_token_loss
from lightning_vlm.losses.output import LossOutput, WeightedLoss
from lightning_vlm.models.blip2 import BLIP2Output
from lightning_vlm.models.similarity import query_text_similarity, scale_logits, temperature


def itc_loss(query_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE on the max-over-queries similarity of (B, Q, E) queries and (B, E) captions."""
    n = query_emb.shape[0]
    labels = torch.arange(n, device=query_emb.device) + rank_offset(n)
    sim_i2t = query_text_similarity(query_emb, gather_with_grad(text_emb))
    sim_t2i = query_text_similarity(gather_with_grad(query_emb), text_emb).T
    return (F.cross_entropy(scale_logits(sim_i2t, logit_scale), labels)
            + F.cross_entropy(scale_logits(sim_t2i, logit_scale), labels)) / 2


class BLIP2Loss(WeightedLoss):
    """Terms "itc", "itm", "itg" (stage 1) and "lm" (stage 2); the staged plan's phases switch their weights, and
    the model computes only the terms of non-zero weight. ITG smooths its labels by ``itg_label_smoothing`` (0.1,
    as LAVIS trains it)."""

    term_names = ("itc", "itm", "itg", "lm")

    def __init__(self, weights: dict[str, float] | None = None, itg_label_smoothing: float = 0.1,
                 lm_reduction: Reduction = "token") -> None:
        super().__init__(weights)
        self.itg_label_smoothing, self.lm_reduction = itg_label_smoothing, lm_reduction

    def forward(self, out: BLIP2Output) -> LossOutput:
        raw: dict[str, Tensor] = {}
        if out.query_emb is not None:
            raw["itc"] = itc_loss(out.query_emb, out.text_emb, out.logit_scale)
        if out.itm_logits is not None:
            raw["itm"] = F.cross_entropy(out.itm_logits, out.itm_labels)
        if out.itg is not None:
            raw["itg"] = next_token_loss(out.itg, label_smoothing=self.itg_label_smoothing)
        if out.lm is not None:
            raw["lm"] = next_token_loss(out.lm, self.lm_reduction)
        return self.weigh(raw, {"logit_scale": temperature(out.logit_scale.detach())})
