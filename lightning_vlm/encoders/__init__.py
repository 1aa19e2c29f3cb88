"""Encoders: timm vision backbones, transformers text encoders and causal language models (plain PyTorch)."""

from lightning_vlm.encoders.lm import LanguageModel, NextTokenOutput
from lightning_vlm.encoders.patches import RawPatches
from lightning_vlm.encoders.text import TextEncoder, TextOutput
from lightning_vlm.encoders.vision import ConvStem, VisionEncoder, VisionOutput

__all__ = ["ConvStem", "LanguageModel", "NextTokenOutput", "RawPatches", "TextEncoder", "TextOutput", "VisionEncoder",
           "VisionOutput"]
