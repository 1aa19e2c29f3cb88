"""Encoders: timm vision backbones and transformers text encoders (plain PyTorch)."""

from lightning_vlm.encoders.text import TextEncoder, TextOutput
from lightning_vlm.encoders.vision import ConvStem, VisionEncoder, VisionOutput

__all__ = ["ConvStem", "TextEncoder", "TextOutput", "VisionEncoder", "VisionOutput"]
