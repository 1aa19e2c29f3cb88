"""Logs a grid of validation images with their captions (and the model's outputs, when it has any) to TensorBoard."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from PIL import Image, ImageDraw

from lightning_vlm.data.collate import first_rows
from lightning_vlm.data.transforms import CLIP_MEAN, CLIP_STD
from lightning_vlm.paradigms.base import VLMParadigm


class SampleImageLogger(Callback):
    """At the end of each validation, draws the first `num_samples` images of the first val batch.

    Under each image: its caption, the sample's prompt -> target, and, if the module defines
    ``sample_outputs(batch) -> list[str]`` (generated captions, answers), what the model produced. A module that
    defines ``reconstructions(batch) -> (masked, reconstructed)`` (masked image modelling) also gets a grid
    "reconstructions": each image, its masked input and the reconstruction, side by side.
    """

    def __init__(self, num_samples: int = 8, tile: int = 160) -> None:
        self.num_samples, self.tile = num_samples, tile
        self._batch: dict | None = None

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._batch = first_rows(batch, self.num_samples)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: VLMParadigm) -> None:
        batch, self._batch = self._batch, None
        writer = getattr(trainer.logger, "experiment", None)
        if batch is None or trainer.sanity_checking or not hasattr(writer, "add_image"):
            return
        outputs = pl_module.sample_outputs(batch)
        mean, std = pl_module.image_mean or CLIP_MEAN, pl_module.image_std or CLIP_STD
        images = denormalize(batch["pixel_values"][: len(batch["meta"])], mean, std)  # after them: demonstrations
        lines = [describe(meta, outputs[i] if outputs else None) for i, meta in enumerate(batch["meta"])]
        grid = captioned_grid(images, lines, self.tile)
        writer.add_image("samples", np.asarray(grid), trainer.global_step, dataformats="HWC")
        writer.add_text("samples", "\n\n".join(f"{i}: {line}" for i, line in enumerate(lines)), trainer.global_step)
        reconstructed = pl_module.reconstructions(batch)
        if reconstructed is not None:
            masked, rebuilt = reconstructed
            triples = [im for trio in zip(images, denormalize(masked, mean, std), denormalize(rebuilt, mean, std))
                       for im in trio]
            labels = ["original", "masked input", "reconstruction"] * len(images)
            grid = captioned_grid(triples, labels, self.tile, columns=6, text_height=16)
            writer.add_image("reconstructions", np.asarray(grid), trainer.global_step, dataformats="HWC")


def denormalize(pixels: torch.Tensor, mean, std) -> list[Image.Image]:
    """Normalised (B, 3, H, W) pixels back to PIL images."""
    mean = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    arrays = ((pixels.float() * std + mean).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def describe(meta: dict, output: str | None) -> str:
    """The text shown under one image."""
    text = meta.get("caption", "")
    if meta.get("task") not in (None, "caption", "contrastive"):
        text += f" | {meta['prompt']} -> {meta['target']}"
    return text + (f" | model: {output}" if output is not None else "")


def captioned_grid(images: list[Image.Image], lines: list[str], tile: int, columns: int = 4,
                   text_height: int = 80) -> Image.Image:
    """Images upscaled to `tile` pixels with their wrapped text beneath, laid out in a grid."""
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * (tile + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, line) in enumerate(zip(images, lines)):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_height)
        grid.paste(image.resize((tile, tile), Image.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + tile + 2), "\n".join(textwrap.wrap(line, 26)[:6]), fill="black")
    return grid
