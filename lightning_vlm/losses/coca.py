"""CoCa's loss (Yu et al., 2022): the contrastive loss between the pooled image and the caption's [CLS] embedding,
and the captioning loss through the multimodal layers, weighted 1 and 2 as in the paper."""

from __future__ import annotations

from lightning_vlm.losses.contrastive import CLIPLoss
from lightning_vlm.losses.language import next_token_loss
from lightning_vlm.losses.output import LossOutput, WeightedLoss
from lightning_vlm.models.coca import CoCaOutput


class CoCaLoss(WeightedLoss):
    """Terms "itc" (CLIP's loss) and "caption" (`next_token_loss`)."""

    term_names = ("itc", "caption")
    default_weights = {"itc": 1.0, "caption": 2.0}

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        super().__init__(weights)
        self.contrastive = CLIPLoss()

    def forward(self, out: CoCaOutput) -> LossOutput:
        itc = self.contrastive(out.contrastive)
        return self.weigh({"itc": itc.total, "caption": next_token_loss(out.caption)}, itc.stats)
