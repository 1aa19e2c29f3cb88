"""Attentional pooling: a fixed number of learned queries read a variable number of tokens (CoCa's pooler, and
Llip's mixture tokens for an image encoder that cannot append tokens of its own, such as a CNN)."""

import torch
from torch import Tensor, nn


class AttentionPooler(nn.Module):
    """`num_queries` learned queries cross-attend to the image tokens (CoCa's attentional pooling).

    `query_std` is the queries' initial scale: at 0.02 every query starts reading (almost) the tokens' mean, so the
    outputs start alike; at 1 (open_clip's pooler) each starts reading its own mix of the tokens.
    """

    def __init__(self, width_in: int, width: int, num_queries: int, num_heads: int, query_std: float = 0.02) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * query_std)
        self.attention = nn.MultiheadAttention(width, num_heads, kdim=width_in, vdim=width_in, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, D_in) -> (B, num_queries, width)."""
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        return self.norm(self.attention(queries, tokens, tokens, need_weights=False)[0])
