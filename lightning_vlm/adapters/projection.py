"""Projections from image features (or query outputs) into a language model's embedding space, token by token:
the identity, linear and MLP adapters."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lightning_vlm.adapters.base import Adapter


def make_projection(kind: Literal["linear", "mlp"], width_in: int, width_out: int) -> nn.Module:
    """(B, N, width_in) -> (B, N, width_out): a linear layer (BLIP-2, LLaVA-1) or a two-layer GELU MLP
    (LLaVA-1.5)."""
    if kind == "linear":
        return nn.Linear(width_in, width_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width_in, width_out), nn.GELU(), nn.Linear(width_out, width_out))
    raise ValueError(f"projection must be 'linear' or 'mlp', got {kind!r}")


class Identity(Adapter):
    """Image tokens as they are (Fuyu-style or when the encoder already speaks the LM's width)."""

    def _build(self, width_in: int, width_out: int) -> None:
        if width_in != width_out:
            raise ValueError(f"the identity adapter needs equal widths, got {width_in} -> {width_out}")

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens

    def num_output_tokens(self, num_tokens: int) -> int:
        return num_tokens


class Linear(Adapter):
    """One linear map per token (LLaVA-1, BLIP-2)."""

    def _build(self, width_in: int, width_out: int) -> None:
        self.proj = make_projection("linear", width_in, width_out)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(tokens)

    def num_output_tokens(self, num_tokens: int) -> int:
        return num_tokens


class MLP(Linear):
    """A two-layer GELU MLP per token (LLaVA-1.5)."""

    def _build(self, width_in: int, width_out: int) -> None:
        self.proj = make_projection("mlp", width_in, width_out)
