"""Adapters between image features and a text model, all (B, N, D_in) -> (B, M, D_out) (plain PyTorch)."""

from lightning_vlm.adapters.qformer import QFormer, QFormerOutput, attention_mask

__all__ = ["QFormer", "QFormerOutput", "attention_mask"]
