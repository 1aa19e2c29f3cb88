"""Fuyu's "no image encoder" (Adept, 2023): an image is cut into raw pixel patches, each flattened into one token; the
adapter that follows (a linear layer in Fuyu) embeds them straight into the language model."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_vlm.encoders.vision import VisionOutput


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p * p * C), patches in the row-major order of a ViT's patch tokens."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """The inverse of `patchify`: (B, N, p * p * C) -> (B, C, H, W)."""
    b, _, dim = patches.shape
    p = patch_size
    c = dim // (p * p)
    images = patches.reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return images.reshape(b, c, height, width)


class RawPatches(nn.Module):
    """(B, 3, H, W) -> (B, H W / p^2, p^2 x 3) flattened patches, row by row; no parameters. Stands where a
    `VisionEncoder` would, so any model that reads patch tokens (LLaVA, PrefixLM) becomes Fuyu-style with it.
    Fuyu's image-newline tokens between patch rows are left out: the LM's positions already order the patches."""

    def __init__(self, patch_size: int = 8, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        self.patch_size, self.mean, self.std = patch_size, tuple(mean), tuple(std)

    @property
    def width(self) -> int:
        return self.patch_size**2 * 3

    @property
    def data_config(self) -> dict[str, Any]:
        """The normalisation the DataModule applies (Fuyu scales pixels to [-1, 1])."""
        return {"mean": self.mean, "std": self.std}

    def forward(self, pixel_values: Tensor) -> VisionOutput:
        patches = patchify(pixel_values, self.patch_size)
        return VisionOutput(patches, patches, patches.mean(dim=1))
