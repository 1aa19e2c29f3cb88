"""The one return type of every loss module, so each term is logged and ablated by name."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LossOutput:
    """total: the sum of `terms` (already weighted), to backpropagate; stats: detached values to log only."""

    total: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_terms(cls, terms: dict[str, Tensor], stats: dict[str, Tensor] | None = None) -> LossOutput:
        """Build from weighted terms; total is their sum."""
        return cls(sum(terms.values()), terms, stats or {})
