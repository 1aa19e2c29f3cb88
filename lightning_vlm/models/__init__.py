"""Models: compositions of encoders, adapters and heads, one file per family (plain nn.Module)."""

from lightning_vlm.models.contrastive import (
    ContrastiveHeads,
    ContrastiveOutput,
    DualEncoder,
    Llip,
    LlipOutput,
    MixtureCrossAttention,
)

__all__ = ["ContrastiveHeads", "ContrastiveOutput", "DualEncoder", "Llip", "LlipOutput", "MixtureCrossAttention"]
