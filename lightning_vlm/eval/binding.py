"""Attribute binding: does the true caption outscore a hard negative with one attribute or relation swapped?"""

from collections.abc import Sequence

import torch
from torch import Tensor


def binding_accuracy(scores_true: Tensor, scores_neg: Tensor, kinds: Sequence[str]) -> dict[str, float]:
    """Fraction of pairs whose true caption scores strictly above its hard negative: ``binding_all`` and, per
    negative kind (colour, shape, size, relation), ``binding_{kind}``. A tie counts as a failure."""
    if not len(scores_true) == len(scores_neg) == len(kinds):
        raise ValueError(f"got {len(scores_true)} true scores, {len(scores_neg)} negative scores, {len(kinds)} kinds")
    wins = (scores_true > scores_neg).float()
    per_kind = {}
    for kind in sorted(set(kinds)):
        of_kind = torch.tensor([k == kind for k in kinds], device=wins.device)
        per_kind[f"binding_{kind}"] = wins[of_kind].mean().item()
    return {"binding_all": wins.mean().item(), **per_kind}
