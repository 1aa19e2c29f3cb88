"""LLaVA-NeXT's AnyRes (Liu et al., 2024): a large image is read as tiles of the image encoder's input size.

The image is resized to the grid of tiles (one of ``grids``) that keeps most of its resolution and wastes least,
cut into tiles, and each tile is encoded on its own, after an overview (the whole image downscaled to one tile).
The tokens are the overview's, then the tiles' laid out as one grid in raster order, with an image-newline token
after each of its rows where the model has one (LLaVA-NeXT puts none after the overview's rows either).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vlm.encoders.patches import split_padding
from lightning_vlm.models.visual_prompt import grid_layout

DEFAULT_GRIDS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


def best_grid(height: int, width: int, tile_size: int, grids: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (rows, columns) of tiles an image of this size is read as: the grid whose canvas keeps most of the image's
    pixels once it is scaled to fit inside it (at most its own), then the one that wastes least of the canvas
    (LLaVA-NeXT's ``select_best_resolution``)."""
    best, best_kept, best_waste = grids[0], -1, 0
    for rows, cols in grids:
        scale = min(cols * tile_size / width, rows * tile_size / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = rows * cols * tile_size**2 - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (rows, cols), kept, waste
    return best


class AnyRes(nn.Module):
    """Tiles and an overview per image, encoded as one batch (no parameters). ``tile_size``: the image encoder's
    input side; ``grids``: the allowed (rows, columns) of tiles. The image is stretched to its grid's canvas (the
    grid is the one of least waste; LLaVA-NeXT pads to it and drops the padding's tokens instead)."""

    def __init__(self, tile_size: int = 64, grids: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.tile_size, self.grids = tile_size, tuple(tuple(grid) for grid in grids or DEFAULT_GRIDS)

    def tiles(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(3, h, w) -> (1 + rows x columns, 3, t, t): the overview, then the tiles in raster order; and the grid."""
        t = self.tile_size
        rows, cols = best_grid(image.shape[-2], image.shape[-1], t, self.grids)
        canvas = F.interpolate(image[None], size=(rows * t, cols * t), mode="bilinear", antialias=True)
        overview = F.interpolate(image[None], size=(t, t), mode="bilinear", antialias=True)
        tiles = canvas.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        return torch.cat([overview, tiles]), (rows, cols)

    def forward(self, pixel_values: Tensor, encode: Callable[[Tensor], Tensor], newline: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) images, NaN-padded where they are smaller than the batch's largest -> (B, M, D) each image's
        tokens first and (B,) how many; ``encode`` maps (T, 3, t, t) tiles to (T, K, D) tokens of a square grid."""
        pixels, mask = split_padding(pixel_values)
        if mask is None:
            mask = torch.ones_like(pixels[:, 0], dtype=torch.bool)
        cut = [self.tiles(image[:, : int(own[:, 0].sum()), : int(own[0].sum())]) for image, own in zip(pixels, mask)]
        tokens = encode(torch.cat([tiles for tiles, _ in cut])).split([len(tiles) for tiles, _ in cut])
        images = [self._laid_out(image_tokens, grid, newline) for image_tokens, (_, grid) in zip(tokens, cut)]
        lengths = torch.tensor([len(image) for image in images], device=pixels.device)
        return nn.utils.rnn.pad_sequence(images, batch_first=True), lengths

    @staticmethod
    def _laid_out(tokens: Tensor, grid: tuple[int, int], newline: Tensor | None) -> Tensor:
        """(1 + R C, K, D) tokens of an image's overview and tiles -> (M, D): the overview's, then the tiles' as one
        grid of R sqrt(K) x C sqrt(K) tokens in raster order, newline-ended rows."""
        (rows, cols), side, dim = grid, math.isqrt(tokens.shape[1]), tokens.shape[-1]
        if side * side != tokens.shape[1]:
            raise ValueError(f"AnyRes lays tiles out as square grids of tokens; a tile gave {tokens.shape[1]}")
        combined = tokens[1:].view(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(1, -1, dim)
        laid_out, _ = grid_layout(combined, (rows * side, cols * side), newline=newline)
        return torch.cat([tokens[0], laid_out[0]])
