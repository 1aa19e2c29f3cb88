"""The next-token loss, and the one place where labels are shifted: position t predicts token t + 1.

Every text-generating objective goes through it: a language model's loss over the target text (LLaVA, BLIP-2's
stage 2, PaliGemma, Flamingo, Fuyu), CoCa's captioning loss and BLIP-2's ITG. Labels come unshifted from the
collator, `IGNORE_INDEX` wherever no loss applies.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_vlm.encoders.lm import NextTokenOutput
from lightning_vlm.losses.output import LossOutput, WeightedLoss
from lightning_vlm.tokens import IGNORE_INDEX

Reduction = Literal["token", "sample"]


def shift_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) unshifted labels -> the targets (B, L - 1) of positions 0 .. L - 2 (each predicts the next token) and
    where one is labelled (B, L - 1) bool."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def next_token_loss(out: NextTokenOutput, reduction: Reduction = "token", label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of the next token at every labelled position, the output head applied only there (not to the
    logits of every position over the whole vocabulary: a fifth of SmolLM2-135M's compute). "token" averages over
    the batch's labelled tokens (transformers' way); "sample" over each sequence's first, then over sequences, so a
    one-word answer weighs as much as a twenty-token caption."""
    targets, keep = shift_labels(out.labels)
    labelled = out.hidden[:, :-1][keep]
    logits = (labelled if out.head is None else out.head(labelled)).float()
    if reduction == "token":
        return F.cross_entropy(logits, targets[keep], label_smoothing=label_smoothing)
    losses = F.cross_entropy(logits, targets[keep], reduction="none", label_smoothing=label_smoothing)
    per_row = losses.new_zeros(len(keep)).index_add(0, keep.nonzero()[:, 0], losses)
    counts = keep.sum(1)
    return (per_row[counts > 0] / counts[counts > 0]).mean()


def sequence_log_likelihood(out: NextTokenOutput) -> Tensor:
    """Each row's summed log-probability of its labelled tokens (B,): how likely a candidate text is, given what
    precedes it (a generative model's zero-shot score, eval/likelihood.py)."""
    targets, keep = shift_labels(out.labels)
    labelled = out.hidden[:, :-1][keep]
    logits = (labelled if out.head is None else out.head(labelled)).float()
    token_log_probs = -F.cross_entropy(logits, targets[keep], reduction="none")
    return token_log_probs.new_zeros(len(keep)).index_add(0, keep.nonzero()[:, 0], token_log_probs)


class NextTokenLoss(WeightedLoss):
    """The language-modelling loss of the generative family: term "lm" (`next_token_loss`)."""

    term_names = ("lm",)

    def __init__(self, weights: dict[str, float] | None = None, reduction: Reduction = "token") -> None:
        super().__init__(weights)
        if reduction not in ("token", "sample"):
            raise ValueError(f"reduction must be 'token' or 'sample', got {reduction!r}")
        self.reduction = reduction

    def forward(self, out: NextTokenOutput) -> LossOutput:
        return self.weigh({"lm": next_token_loss(out, self.reduction)})
