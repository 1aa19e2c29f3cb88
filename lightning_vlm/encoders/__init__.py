"""Encoders: timm vision backbones and transformers text encoders (plain PyTorch)."""

from lightning_vlm.encoders.text import TextEncoder, TextOutput
from lightning_vlm.encoders.vision import ConvStem, VisionEncoder, VisionOutput
from lightning_vlm.encoders.patches import RawPatches

__all__ = ["ConvStem", "RawPatches", "TextEncoder", "TextOutput", "VisionEncoder", "VisionOutput"]
