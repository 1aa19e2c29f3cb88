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


def split_padding(pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
    """Images of different sizes padded to a batch's largest with NaN (the DataModule's ``keep_aspect``) -> the
    pixels with the padding zeroed and the (B, H, W) mask of each image's own pixels; untouched, with no mask, when
    nothing is padded."""
    padding = pixel_values.isnan()
    if not padding.any():
        return pixel_values, None
    return pixel_values.nan_to_num(0.0), ~padding.any(dim=1)


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
    Images of any size (multiples of p) are read as they are; in a batch padded to its largest image (NaN padding,
    see `split_padding`) the output's ``valid`` marks each image's own patches (a patch partly padding is not).
    Fuyu's image-newline tokens after each row of patches are the model's (`LLaVA(image_newline=True)`)."""

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
        pixels, mask = split_padding(pixel_values)
        p = self.patch_size
        patches = patchify(pixels, p)
        grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        if mask is None:
            return VisionOutput(patches, patches, patches.mean(dim=1), grid=grid)
        valid = mask.reshape(len(mask), grid[0], p, grid[1], p).all(dim=4).all(dim=2).flatten(1)
        pooled = (patches * valid[..., None]).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)
        return VisionOutput(patches, patches, pooled, grid=grid, valid=valid)
