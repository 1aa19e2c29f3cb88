"""The global random generators a training step draws from (dropout, masks, negatives), captured and restored so a
resumed run draws what an uninterrupted one would. Lightning keeps no generator state in its checkpoints, so this
is written here: torch's (CPU and every CUDA device), Python's and NumPy's."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def random_state() -> dict[str, Any]:
    """This process's generator states."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }


def set_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))


def _numpy_state() -> tuple:
    """NumPy's state in types a ``weights_only`` checkpoint load accepts (its key as a tensor, not an ndarray)."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    return kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)


def every_rank_random_state() -> list[dict[str, Any]]:
    """Every rank's generator states, in rank order (ranks draw different amounts: their batches differ in shape);
    a collective call on every rank of a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [random_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, random_state())
    return states
