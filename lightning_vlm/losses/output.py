"""What every loss module returns, and the base that gives every family one spelling of its loss weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


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


class WeightedLoss(nn.Module):
    """A loss module of named terms, each times its weight in ``weights`` (`term_names` lists the terms it has;
    a term not named weighs `default_weights`' value, else 1). A term of weight 0 is left out of the total, and a
    model asked for `active_terms` need not compute it. A staged phase sets weights with `set_weights`; a name the
    loss does not have is an error naming the ones it has."""

    term_names: tuple[str, ...] = ()
    default_weights: dict[str, float] = {}

    def __init__(self, weights: dict[str, float] | None = None, term_names: tuple[str, ...] | None = None) -> None:
        super().__init__()
        if term_names is not None:
            self.term_names = term_names
        self.weights = {name: self.default_weights.get(name, 1.0) for name in self.term_names}
        self.set_weights(weights or {})

    def set_weights(self, weights: dict[str, float]) -> None:
        """Change the named terms' weights (the others keep theirs)."""
        self.check_weights(weights)
        self.weights.update({name: float(value) for name, value in weights.items()})

    def check_weights(self, weights: dict[str, float]) -> None:
        unknown = sorted(set(weights) - set(self.term_names))
        if unknown:
            raise ValueError(f"loss weights name unknown terms {unknown}: {type(self).__name__}'s terms are "
                             f"{list(self.term_names)}")

    def active_terms(self) -> set[str]:
        """The terms whose weight is not zero: what the model has to compute."""
        return {name for name, weight in self.weights.items() if weight != 0}

    def weigh(self, raw: dict[str, Tensor], stats: dict[str, Tensor] | None = None) -> LossOutput:
        """The active terms of ``raw`` times their weights, summed."""
        terms = {name: self.weights[name] * value for name, value in raw.items() if self.weights[name] != 0}
        if not terms:
            raise ValueError(f"{type(self).__name__}: every computed term has weight zero ({self.weights})")
        return LossOutput.from_terms(terms, stats)
