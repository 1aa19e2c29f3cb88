"""Image encoder: any timm backbone by name, returning token features and a pooled vector."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import timm
import torch
from timm.layers import HybridEmbed
from timm.models import checkpoint_seq
from torch import Tensor, nn


@dataclass
class VisionOutput:
    """Features of one batch of images.

    tokens: (B, P + N, D) every token of the final layer, prefix (cls/register) tokens first; extra tokens excluded.
    patch_tokens: (B, N, D) the same without the P prefix tokens.
    pooled: (B, D) timm's pooled pre-logits vector (cls token or average, as the backbone defines).
    extra_tokens: (B, K, D) outputs at the K appended learnable tokens (Llip's mixture tokens), or None.
    patch_mask: (B, N) True where the patch embedding was replaced by the mask token (masked image modelling),
        or None.
    grid: (rows, columns) of the patch tokens in raster order, where the encoder knows them (None: a square).
    valid: (B, N) False on the patches of batch padding (images of different sizes padded to the largest), or None
        when every patch is an image's own.
    """

    tokens: Tensor
    patch_tokens: Tensor
    pooled: Tensor
    extra_tokens: Tensor | None = None
    patch_mask: Tensor | None = None
    grid: tuple[int, int] | None = None
    valid: Tensor | None = None


@dataclass
class ConvStem:
    """A timm CNN whose feature map at stage `out_index` replaces a ViT's patch embedding (a hybrid ViT, as in
    Dosovitskiy et al. 2021, sec. 3.1). Convolutions learn small shapes far faster than patchify from scratch."""

    name: str = "resnet10t"
    out_index: int = 2
    pretrained: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The CNN truncated after stage `out_index`, returning that stage's feature map."""
        return timm.create_model(
            self.name, pretrained=self.pretrained, features_only=True, out_indices=(self.out_index,), **self.overrides
        )


class VisionEncoder(nn.Module):
    """A timm model without classifier; ViT-style ones optionally with K extra learnable tokens (Llip) and a
    learnable mask token that replaces the embeddings of masked patches (masked image modelling: FLAVA, MaskVLM).

    `overrides` go to `timm.create_model` (img_size, patch_size, depth, embed_dim, num_heads, ...),
    so tiny test configs and pretrained backbones share one class. Images of different sizes padded into one batch
    (the DataModule's ``keep_aspect``) reach it through `AnyRes` tiles only: its attention and convolutions would mix
    the padding into the image's features. A `stem` makes a ViT hybrid: its tokens are the
    cells of a CNN's feature map, through timm's own HybridEmbed. ``channels_last`` (default: for CNNs, the models
    without a patch embedding) keeps weights and images in NHWC, which oneDNN and cuDNN convolve faster (a
    GroupNorm ResNet-10-T trains 1.3x faster on this CPU, with identical numbers). ``fused_attention=False`` has
    timm's attention layers multiply out softmax(QK^T)V instead of calling SDPA, whose CPU backward is slow under
    bf16 autocast (the Llip recipe's step: 0.48 s fused, 0.24 s unfused; 0.36 s in float32).
    ``grad_checkpointing``: timm's activation checkpointing of the blocks (or stages): less memory, one more forward.
    """

    def __init__(
        self,
        name: str = "vit_tiny_patch16_224",
        pretrained: bool = False,
        num_extra_tokens: int = 0,
        overrides: dict[str, Any] | None = None,
        stem: ConvStem | None = None,
        channels_last: bool | None = None,
        mask_token: bool = False,
        fused_attention: bool = True,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        kwargs = dict(overrides or {})
        if stem is not None:
            kwargs = {"patch_size": 1, **kwargs, "embed_layer": partial(HybridEmbed, backbone=stem.build())}
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        self.num_prefix_tokens: int = getattr(self.model, "num_prefix_tokens", 0)
        for layer in self.model.modules():
            if hasattr(layer, "fused_attn"):
                layer.fused_attn = fused_attention
        self.channels_last = not hasattr(self.model, "patch_embed") if channels_last is None else channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if num_extra_tokens or mask_token:
            missing = [a for a in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm")
                       if not hasattr(self.model, a)]
            if missing:
                raise ValueError(f"extra and mask tokens need a ViT-style timm model; {name!r} lacks {missing}")
        self.extra_tokens = (nn.Parameter(torch.randn(1, num_extra_tokens, self.width) * 0.02) if num_extra_tokens
                             else None)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.width)) if mask_token else None
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)  # timm's own switch: its blocks or stages recompute in backward

    @property
    def width(self) -> int:
        """Feature dimension D of tokens and pooled vector."""
        return self.model.num_features

    @property
    def patch_size(self) -> int:
        """Side in pixels of the square patch behind each patch token (ViT-style models only)."""
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "patch_size"):
            raise ValueError("patch_size is defined for ViT-style models (a patch embedding) only")
        height, width = patch_embed.patch_size
        if height != width:
            raise ValueError(f"non-square patches {patch_embed.patch_size} are not supported")
        return height

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing config (mean, std, interpolation, ...); input_size follows an img_size override."""
        config = timm.data.resolve_model_data_config(self.model)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            config["input_size"] = (config["input_size"][0], *img_size)
        return config

    def forward(self, pixel_values: Tensor, patch_mask: Tensor | None = None) -> VisionOutput:
        """Encode (B, 3, H, W) images into tokens and a pooled vector, the patches where the (B, N) bool
        `patch_mask` is True replaced by the mask token. A frozen encoder (no parameter requires grad) runs under
        `torch.no_grad`, so no activation is kept for a backward that cannot reach it."""
        if patch_mask is not None and self.mask_token is None:
            raise ValueError("a patch_mask needs VisionEncoder(mask_token=True)")
        if not any(p.requires_grad for p in self.parameters()):
            with torch.no_grad():
                return self._encode(pixel_values, patch_mask)
        return self._encode(pixel_values, patch_mask)

    def _encode(self, pixel_values: Tensor, patch_mask: Tensor | None) -> VisionOutput:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        if self.extra_tokens is None and patch_mask is None:
            features, extra = self.model.forward_features(pixel_values), None
        else:
            features, extra = self._forward_vit(pixel_values, patch_mask)
        pooled = self.model.forward_head(features, pre_logits=True)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features  # CNN maps -> (B, HW, C)
        return VisionOutput(tokens, tokens[:, self.num_prefix_tokens:], pooled, extra, patch_mask)

    def _forward_vit(self, pixel_values: Tensor, patch_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """timm ViT's forward_features, with masked patch embeddings replaced by the mask token before position
        embedding (as BEiT and SimMIM do), and the extra tokens appended after it (they carry no position)."""
        m = self.model
        x = m.patch_embed(pixel_values)
        if patch_mask is not None:
            x = torch.where(patch_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = m.patch_drop(m._pos_embed(x))
        k = 0 if self.extra_tokens is None else self.extra_tokens.shape[1]
        if k:
            x = torch.cat([x, self.extra_tokens.expand(x.shape[0], -1, -1)], dim=1)
        x = m.norm_pre(x)
        x = checkpoint_seq(m.blocks, x) if m.grad_checkpointing and torch.is_grad_enabled() else m.blocks(x)
        x = m.norm(x)
        return (x[:, :-k], x[:, -k:]) if k else (x, None)
