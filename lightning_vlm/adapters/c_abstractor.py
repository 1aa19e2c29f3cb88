"""C-Abstractor (Cha et al., 2023, Honeybee): convolutional blocks on the grid of patch tokens, adaptive average
pooling to a chosen number of tokens, more blocks, then an MLP into the LM's width; local context survives the
reduction, unlike a set of learned queries."""

from __future__ import annotations

import math

from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import Tensor, nn

from lightning_vlm.adapters.base import Adapter, square_grid
from lightning_vlm.adapters.projection import make_projection


class CAbstractor(Adapter):
    """`depth` RegNet bottleneck blocks (timm's `RegStage`, SiLU and LayerNorm2d as in Honeybee's code), pooling of
    the √N x √N grid to √M x √M with M = `num_queries` (a square), `depth` more blocks at width `hidden` (default:
    the image width), then the MLP. Honeybee's optional learned position embedding is left out: it needs N at build.
    """

    def __init__(self, num_queries: int = 4, depth: int = 1, hidden: int | None = None) -> None:
        super().__init__()
        self.side = math.isqrt(num_queries)
        if self.side**2 != num_queries:
            raise ValueError(f"num_queries {num_queries} is not a square: the pooled grid is √M x √M")
        self.num_queries, self.depth, self.hidden = num_queries, depth, hidden

    def _build(self, width_in: int, width_out: int) -> None:
        hidden = self.hidden or width_in
        blocks = dict(stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        self.net = nn.Sequential(RegStage(self.depth, width_in, hidden, **blocks), nn.AdaptiveAvgPool2d(self.side),
                                 RegStage(self.depth, hidden, hidden, **blocks))
        self.proj = make_projection("mlp", hidden, width_out)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, D_in), N a square grid in row-major order -> (B, num_queries, D_out)."""
        b, n, d = tokens.shape
        side = square_grid(n)
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)
        return self.proj(self.net(grid).flatten(2).transpose(1, 2))

    def num_output_tokens(self, num_tokens: int) -> int:
        return self.num_queries
