"""The statistics of a frozen image encoder's tokens, as a reader downstream (a Q-Former, a projector) first sees them.

Encodes 1,000 val images with the encoder of one or more checkpoints and prints, side by side, what sets how a reader
trained from scratch can start: the scale of the tokens (RMS over channels, its spread over images), how sparse they
are (the share of exact zeros a ReLU leaves), how many channels carry the variance across images (participation
ratio of the channel covariance's eigenvalues), and how alike two images' tokens are (mean cosine between images),
raw and after a LayerNorm over channels (what `BLIP2(vision_norm=True)` hands its Q-Former, before its affine).

    python benchmarks/feature_stats.py --config recipes/clip.yaml --checkpoint CKPT [OTHER.ckpt ...]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_vlm.cli import load_run
from lightning_vlm.eval.probe import encode_split


def statistics(tokens: Tensor) -> dict[str, float]:
    """Scale, sparsity, channel spread and image-to-image similarity of (B, N, D) tokens."""
    rms = tokens.pow(2).mean(-1).sqrt()  # (B, N)
    flat = tokens.flatten(1)  # an image as the concatenation of its tokens
    centred = flat - flat.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / len(flat)).clamp_min(0)
    unit = F.normalize(flat, dim=-1)
    cosine = unit @ unit.T
    off_diagonal = cosine[~torch.eye(len(cosine), dtype=torch.bool)]
    return {
        "token RMS": rms.mean().item(),
        "RMS spread (std / mean)": (rms.std() / rms.mean()).item(),
        "max |value|": tokens.abs().max().item(),
        "zeros": (tokens == 0).float().mean().item(),
        "participation ratio": (eigenvalues.sum() ** 2 / eigenvalues.pow(2).sum()).item(),
        "image-image cosine": off_diagonal.mean().item(),
        "between-image / total variance": (centred.pow(2).sum() / flat.pow(2).sum()).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe that trained the image encoder")
    parser.add_argument("--checkpoint", required=True, nargs="+")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {}
    for checkpoint in args.checkpoint:
        model, datamodule = load_run(args.config, checkpoint)
        split = encode_split(model.model.vision, datamodule.eval_loader("val"), args.images)
        tokens = split.features[:, :-1]  # without the pooled vector
        normed = F.layer_norm(tokens, tokens.shape[-1:])
        for suffix, stats in (("", statistics(tokens)), (", layer-normed", statistics(normed))):
            for name, value in stats.items():
                rows.setdefault(name + suffix, []).append(value)
    print("| statistic | " + " | ".join(args.checkpoint) + " |")
    print("| --- |" + " --- |" * len(args.checkpoint))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + " |")


if __name__ == "__main__":
    main()
