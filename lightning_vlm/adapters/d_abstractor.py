"""D-Abstractor (Cha et al., 2023, Honeybee): learned queries, each tied to a reference point of the image, read the
grid of patch tokens by deformable attention (Zhu et al., 2021, Deformable DETR): a few bilinear samples at learned
offsets around the point, mixed by learned weights. Local context survives, as in the C-Abstractor, at any M."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vlm.adapters.base import Adapter, square_grid
from lightning_vlm.adapters.projection import make_projection


def grid_points(side: int) -> Tensor:
    """(side², 2) the centres of a side x side grid over the image, as (x, y) in [0, 1], row-major."""
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(side * side, 2)


def deformable_sample(values: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    """Each query's weighted sum of bilinear samples of its head's channels: values (B, N, H, C), N a square grid in
    row-major order; locations (B, M, H, P, 2) as (x, y) in [0, 1] of the image (outside it reads zeros); weights
    (B, M, H, P) -> (B, M, H * C)."""
    b, n, h, c = values.shape
    side, m, p = square_grid(n), locations.shape[1], locations.shape[3]
    grid = values.permute(0, 2, 3, 1).reshape(b * h, c, side, side)
    points = 2 * locations.transpose(1, 2).reshape(b * h, m, p, 2) - 1  # grid_sample's [-1, 1], corners outside
    sampled = F.grid_sample(grid, points, mode="bilinear", padding_mode="zeros", align_corners=False)  # (BH, C, M, P)
    mixed = (sampled * weights.transpose(1, 2).reshape(b * h, 1, m, p)).sum(-1)
    return mixed.view(b, h, c, m).permute(0, 3, 1, 2).reshape(b, m, h * c)


class DeformableAttention(nn.Module):
    """Single-scale deformable attention: per head, `num_points` offsets (in patches) from the query's reference point
    and a softmax over their weights, both predicted from the query; Deformable DETR's initialisation (zero weights,
    point i of head h at i + 1 patches in the head's own direction, uniform attention)."""

    def __init__(self, width: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_points = num_heads, num_points
        self.offsets = nn.Linear(width, num_heads * num_points * 2)
        self.weights = nn.Linear(width, num_heads * num_points)
        self.value, self.out = nn.Linear(width, width), nn.Linear(width, width)
        angles = torch.arange(num_heads) * (2 * math.pi / num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(-1, keepdim=True).values  # onto the square of radius 1
        rings = torch.arange(1, num_points + 1)[None, :, None]
        with torch.no_grad():
            self.offsets.weight.zero_()
            self.offsets.bias.copy_((directions[:, None] * rings).flatten())
            self.weights.weight.zero_()
            self.weights.bias.zero_()

    def sampling_locations(self, queries: Tensor, reference: Tensor, side: int) -> Tensor:
        """(B, M, H, P, 2) where each head's points sample: reference (B, M, 2) plus offsets of a patch's size."""
        b, m, _ = queries.shape
        offsets = self.offsets(queries).view(b, m, self.num_heads, self.num_points, 2)
        return reference[:, :, None, None] + offsets / side

    def forward(self, queries: Tensor, reference: Tensor, tokens: Tensor) -> Tensor:
        """queries (B, M, D) at reference points (B, M, 2) read tokens (B, N, D) -> (B, M, D)."""
        b, n, d = tokens.shape
        values = self.value(tokens).view(b, n, self.num_heads, d // self.num_heads)
        locations = self.sampling_locations(queries, reference, square_grid(n))
        weights = self.weights(queries).view(*queries.shape[:2], self.num_heads, self.num_points).softmax(-1)
        return self.out(deformable_sample(values, locations, weights))


class DeformableLayer(nn.Module):
    """Deformable DETR's decoder layer, simplified: queries attend to each other, read the grid by deformable
    attention, then a ReLU feed-forward, each residual and post-LayerNorm; no query position embedding is added."""

    def __init__(self, width: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.self_attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.cross_attention = DeformableAttention(width, num_heads, num_points)
        self.feed_forward = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))

    def forward(self, queries: Tensor, reference: Tensor, tokens: Tensor) -> Tensor:
        queries = self.norms[0](queries + self.self_attention(queries, queries, queries, need_weights=False)[0])
        queries = self.norms[1](queries + self.cross_attention(queries, reference, tokens))
        return self.norms[2](queries + self.feed_forward(queries))


class DAbstractor(Adapter):
    """M = `num_queries` (a square) queries on a √M x √M grid of fixed reference points, started from the patch grid
    average-pooled to √M x √M plus a learned embedding (Honeybee's "v-pooled" queries), through `num_layers`
    deformable layers at the image width, then the MLP. Simplified from Honeybee: one feature scale, no learned
    position embedding of the patches (it needs N at build)."""

    def __init__(self, num_queries: int = 4, num_layers: int = 2, num_heads: int = 4, num_points: int = 4) -> None:
        super().__init__()
        self.side = math.isqrt(num_queries)
        if self.side**2 != num_queries:
            raise ValueError(f"num_queries {num_queries} is not a square: the reference points are a √M x √M grid")
        self.num_queries, self.num_layers = num_queries, num_layers
        self.num_heads, self.num_points = num_heads, num_points
        self.register_buffer("reference_points", grid_points(self.side), persistent=False)

    def _build(self, width_in: int, width_out: int) -> None:
        self.query_embed = nn.Parameter(torch.zeros(self.num_queries, width_in))
        self.layers = nn.ModuleList(DeformableLayer(width_in, self.num_heads, self.num_points)
                                    for _ in range(self.num_layers))
        self.proj = make_projection("mlp", width_in, width_out)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, D_in), N a square grid in row-major order -> (B, num_queries, D_out)."""
        b, n, d = tokens.shape
        side = square_grid(n)
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)
        queries = F.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2) + self.query_embed
        reference = self.reference_points.expand(b, -1, -1)
        for layer in self.layers:
            queries = layer(queries, reference, tokens)
        return self.proj(queries)

    def num_output_tokens(self, num_tokens: int) -> int:
        return self.num_queries
