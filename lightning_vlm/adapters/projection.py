"""Projections from image features (or query outputs) into a language model's embedding space."""

from __future__ import annotations

from typing import Literal

from torch import nn


def make_projection(kind: Literal["linear", "mlp"], width_in: int, width_out: int) -> nn.Module:
    """(B, N, width_in) -> (B, N, width_out): a linear layer (BLIP-2, LLaVA-1) or a two-layer GELU MLP
    (LLaVA-1.5)."""
    if kind == "linear":
        return nn.Linear(width_in, width_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width_in, width_out), nn.GELU(), nn.Linear(width_out, width_out))
    raise ValueError(f"projection must be 'linear' or 'mlp', got {kind!r}")
