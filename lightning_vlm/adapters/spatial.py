"""Adapters that shrink the grid of patch tokens before the language model reads them: pixel shuffle (space to
depth, Idefics3 / SmolVLM) and adaptive average pooling, each followed by an MLP into the LM's width."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_vlm.adapters.base import Adapter, square_grid
from lightning_vlm.adapters.projection import make_projection


class PixelShuffle(Adapter):
    """Each `factor` x `factor` block of neighbouring patch tokens concatenated into one token (N / factor^2
    tokens of factor^2 x D), then an MLP: fewer tokens, no information dropped."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def _build(self, width_in: int, width_out: int) -> None:
        self.proj = make_projection("mlp", width_in * self.factor**2, width_out)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, d = tokens.shape
        side, r = square_grid(n), self.factor
        if side % r:
            raise ValueError(f"a {side} x {side} grid does not split into {r} x {r} blocks")
        grid = tokens.reshape(b, side // r, r, side // r, r, d).permute(0, 1, 3, 2, 4, 5)  # blocks, then within
        return self.proj(grid.reshape(b, (side // r) ** 2, r * r * d))

    def num_output_tokens(self, num_tokens: int) -> int:
        return num_tokens // self.factor**2


class AveragePool(Adapter):
    """The grid of patch tokens average-pooled to `size` x `size` (adaptive), then an MLP."""

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        self.size = size

    def _build(self, width_in: int, width_out: int) -> None:
        self.proj = make_projection("mlp", width_in, width_out)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, d = tokens.shape
        side = square_grid(n)
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)
        return self.proj(F.adaptive_avg_pool2d(grid, self.size).flatten(2).transpose(1, 2))

    def num_output_tokens(self, num_tokens: int) -> int:
        return self.size**2
