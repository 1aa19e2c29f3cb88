"""Attentional pooling: a fixed number of learned queries read a variable number of tokens (CoCa's poolers, and
Llip's mixture tokens for an image encoder that cannot append tokens of its own, such as a CNN)."""

import torch
from torch import Tensor, nn

from lightning_vlm.adapters.base import Adapter


class AttentionPooler(Adapter):
    """`num_queries` learned queries cross-attend to the image tokens, then a LayerNorm (CoCa's attentional pooling).

    `query_std` is the queries' initial scale: at 0.02 every query starts reading (almost) the tokens' mean, so the
    outputs start alike; at 1 (open_clip's pooler) each starts reading its own mix of the tokens.
    """

    def __init__(self, num_queries: int = 1, num_heads: int = 4, query_std: float = 0.02) -> None:
        super().__init__()
        self.num_queries, self.num_heads, self.query_std = num_queries, num_heads, query_std

    def _build(self, width_in: int, width_out: int) -> None:
        self.queries = nn.Parameter(torch.randn(self.num_queries, width_out) * self.query_std)
        self.attention = nn.MultiheadAttention(width_out, self.num_heads, kdim=width_in, vdim=width_in,
                                               batch_first=True)
        self.norm = nn.LayerNorm(width_out)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, D_in) -> (B, num_queries, D_out)."""
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        return self.norm(self.attention(queries, tokens, tokens, need_weights=False)[0])

    def num_output_tokens(self, num_tokens: int) -> int:
        return self.num_queries
