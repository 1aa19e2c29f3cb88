"""Model soups (Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time"): the uniform soup averages every ingredient's weights; the greedy soup adds
ingredients, best first, only while the held-out metric does not drop. Pure functions over state dicts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from lightning_vlm.errors import InvalidSettingError

State = Mapping[str, Any]


def check_same_architecture(states: Sequence[State], names: Sequence[str]) -> None:
    """Refuse, naming the first differing key, ingredients whose key sets, shapes or dtypes differ: averaging them
    would be meaningless (or fail deep inside torch)."""
    first, first_name = states[0], names[0]
    for state, name in zip(states[1:], names[1:]):
        for key in [k for k in first if k not in state] + [k for k in state if k not in first]:
            having, lacking = (first_name, name) if key in first else (name, first_name)
            raise InvalidSettingError(f"{lacking} and {having} differ in architecture: {key!r} is in {having} only; "
                                      "a soup averages checkpoints of one recipe")
        for key, value in first.items():
            other = state[key]
            if isinstance(value, torch.Tensor) and (not isinstance(other, torch.Tensor) or value.shape != other.shape
                                                    or value.dtype != other.dtype):
                said = f"{tuple(other.shape)} {other.dtype}" if isinstance(other, torch.Tensor) else type(other)
                raise InvalidSettingError(f"{first_name} and {name} differ in architecture: {key!r} is "
                                          f"{tuple(value.shape)} {value.dtype} in {first_name} but {said} in {name}; "
                                          "a soup averages checkpoints of one recipe")


def uniform_soup(states: Sequence[State]) -> dict[str, Any]:
    """The element-wise mean of the floating-point weights; integer and boolean buffers (counters, index tables) and
    anything not a tensor are taken from the first. Summed in float64, so a soup of identical weights is exactly
    those weights."""
    soup = {}
    for key, value in states[0].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            total = sum(state[key].to(torch.float64) for state in states)
            soup[key] = (total / len(states)).to(value.dtype)
        else:
            soup[key] = value
    return soup


class GreedySoup(NamedTuple):
    state: dict[str, Any]
    chosen: list[str]  # the ingredients in the soup, in the order they were added
    score: float


def greedy_soup(states: Sequence[State], names: Sequence[str], score: Callable[[State], float],
                higher_is_better: bool = True, say: Callable[[str], None] = print) -> GreedySoup:
    """Wortsman et al.'s greedy soup: rank the ingredients by `score` (each scored once), start from the best, and
    add each of the others in order only if the uniform soup with it scores no worse; each decision is `say`-ed."""
    check_same_architecture(states, names)
    scores = []
    for state, name in zip(states, names):
        scores.append(score(state))
        say(f"ingredient {name}: {scores[-1]:.4f}")
    order = sorted(range(len(states)), key=lambda i: scores[i], reverse=higher_is_better)
    chosen, best = [order[0]], scores[order[0]]
    say(f"start from {names[order[0]]}: {best:.4f}")
    for index in order[1:]:
        candidate = score(uniform_soup([states[i] for i in [*chosen, index]]))
        kept = candidate >= best if higher_is_better else candidate <= best
        say(f"{'add' if kept else 'skip'} {names[index]}: {candidate:.4f} ({'not worse than' if kept else 'worse than'}"
            f" {best:.4f})")
        if kept:
            chosen, best = [*chosen, index], candidate
    return GreedySoup(uniform_soup([states[i] for i in chosen]), [names[i] for i in chosen], best)


TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "random_state", "current_model_state",
                  "averaging_state")  # what resumes a run (EMAWeightAveraging keeps the raw weights in the last two)


def soup_checkpoint(first: Mapping[str, Any], state: dict[str, Any], ingredients: Sequence[str]) -> dict[str, Any]:
    """The first ingredient's checkpoint with the soup's weights and without its training state, so `validate`,
    `test` and `load_model` read it while a resume (``fit --ckpt_path``) refuses it instead of continuing a run
    that never was."""
    checkpoint = {key: value for key, value in first.items() if key not in TRAINING_STATE}
    return {**checkpoint, "state_dict": state, "soup": list(ingredients)}
