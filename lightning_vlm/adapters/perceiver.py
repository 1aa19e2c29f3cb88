"""Perceiver resampler (Alayrac et al., 2022, Flamingo): a fixed number of learned latents read any number of image
tokens by cross-attention, so the language model sees `num_latents` tokens whatever the image's size."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_vlm.adapters.base import Adapter


class ResamplerLayer(nn.Module):
    """Latents attend to [image tokens; latents] (Flamingo's keys and values), then a GELU feed-forward; pre-norm,
    both residual."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.norm_media, self.norm_latents = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.feed_forward = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                          nn.Linear(4 * width, width))

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        queries = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), queries], dim=1)
        latents = latents + self.attention(queries, context, context, need_weights=False)[0]
        return latents + self.feed_forward(latents)


class PerceiverResampler(Adapter):
    """`num_latents` learned latents through `depth` resampler layers at the image encoder's width, then a linear
    map into the language model's width."""

    def __init__(self, num_latents: int = 64, depth: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        self.num_latents, self.depth, self.num_heads = num_latents, depth, num_heads

    def _build(self, width_in: int, width_out: int) -> None:
        if width_in % self.num_heads:
            raise ValueError(f"image width {width_in} is not divisible by num_heads {self.num_heads}")
        self.latents = nn.Parameter(torch.randn(self.num_latents, width_in) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(width_in, self.num_heads) for _ in range(self.depth))
        self.norm = nn.LayerNorm(width_in)
        self.proj = nn.Linear(width_in, width_out)

    def forward(self, tokens: Tensor) -> Tensor:
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(tokens, latents)
        return self.proj(self.norm(latents))

    def num_output_tokens(self, num_tokens: int) -> int:
        return self.num_latents
