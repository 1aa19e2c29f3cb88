"""What a frozen image encoder's tokens can answer: the ceiling a reader (a Q-Former, a projector, an LM) works under.

The encoder of a checkpoint encodes N training images and the 1,000 val images once; a small attention probe (the
question's known attribute as one query, two cross-attention layers over the image tokens and the pooled vector,
an MLP) then learns the VQA colour question ("What colour is the <shape>?") and the shape question ("What shape is
the <colour> object?") from those features alone, for every object the question names unambiguously, and is
scored on val. Its accuracy with many images says whether the features carry the answers; with few, how many
examples a reader trained from scratch needs.

    python benchmarks/feature_probe.py --config recipes/clip.yaml --checkpoint checkpoints/clip/last.ckpt
    python benchmarks/feature_probe.py ... --images 2000 --epochs 90     # few examples, seen many times
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import Tensor, nn

from lightning_vlm.cli import VLMCLI, load_model
from lightning_vlm.data.sources import read_manifest

QUESTIONS = {"color": "shape", "shape": "color"}  # asked attribute -> the attribute that names the object


class AttentionProbe(nn.Module):
    """One query per question (the naming attribute's embedding), two cross-attention layers over the tokens."""

    def __init__(self, num_names: int, num_answers: int, width: int, num_tokens: int, hidden: int = 256) -> None:
        super().__init__()
        self.name = nn.Embedding(num_names, hidden)
        self.tokens = nn.Linear(width, hidden)
        self.positions = nn.Parameter(torch.zeros(num_tokens, hidden))
        self.attention = nn.ModuleList(nn.MultiheadAttention(hidden, 4, batch_first=True) for _ in range(2))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                  nn.Linear(2 * hidden, num_answers))

    def forward(self, features: Tensor, names: Tensor) -> Tensor:
        context = self.tokens(features) + self.positions
        query = self.name(names)[:, None]
        for attention in self.attention:
            query = query + attention(query, context, context, need_weights=False)[0]
        return self.head(query[:, 0])


def encoder_and_data(config: str, checkpoint: str) -> tuple[nn.Module, LightningDataModule]:
    """The checkpoint's image encoder and the recipe's data, set up to feed it its own normalisation, unflipped."""
    model = load_model(config, checkpoint)
    datamodule = VLMCLI(args=["--config", config, "--trainer.logger", "false"], run=False,
                        trainer_defaults={}).datamodule
    datamodule.hparams.update(hflip=0.0, image_mean=model.image_mean, image_std=model.image_std)
    datamodule.setup("fit")
    return model.model.vision, datamodule


@torch.no_grad()
def encode(vision: nn.Module, loader: Iterable[dict], count: int) -> tuple[Tensor, list[dict]]:
    """(count, tokens + 1, width) float32 features (the tokens, then the pooled vector) and the samples' metadata."""
    features, metas = [], []
    for batch in loader:
        out = vision(batch["pixel_values"])
        features.append(torch.cat([out.tokens, out.pooled[:, None]], 1).float())
        metas += batch["meta"]
        if len(metas) >= count:
            break
    return torch.cat(features)[:count], metas[:count]


def questions(metas: list[dict], asked: str, names: list[str], answers: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """(image row, naming value, answer) of every object whose naming value is unique in its scene."""
    naming, found = QUESTIONS[asked], []
    for row, meta in enumerate(metas):
        counts = collections.Counter(o[naming] for o in meta["objects"])
        found += [(row, names.index(o[naming]), answers.index(o[asked]))
                  for o in meta["objects"] if counts[o[naming]] == 1]
    rows, named, answer = (torch.tensor(column) for column in zip(*found))
    return rows, named, answer


def train_probe(train: tuple[Tensor, ...], val: tuple[Tensor, ...], num_names: int, num_answers: int,
                epochs: int, batch_size: int = 256) -> tuple[float, float]:
    """(train accuracy, val accuracy) of a probe trained on ``train`` = (features, rows, names, answers)."""
    features, rows, names, answers = train
    probe = AttentionProbe(num_names, num_answers, features.shape[-1], features.shape[1])
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        for chunk in torch.randperm(len(rows)).split(batch_size):
            loss = F.cross_entropy(probe(features[rows[chunk]], names[chunk]), answers[chunk])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        def accuracy(split: tuple[Tensor, ...]) -> float:
            feats, r, n, a = split
            return (probe(feats[r], n).argmax(1) == a).float().mean().item()
        return accuracy(train), accuracy(val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe that trained the image encoder")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=int, default=20000, help="training images the probe learns from")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    vision, datamodule = encoder_and_data(args.config, args.checkpoint)
    train_features, train_metas = encode(vision, datamodule.train_dataloader(), args.images)
    val_features, val_metas = encode(vision, datamodule.val_dataloader()[0], 1000)
    manifest = read_manifest(datamodule.hparams.root)
    vocab = {"color": manifest["colors"], "shape": manifest["shapes"]}
    print(f"| question | probe on {args.images} images, {args.epochs} epochs: train | val | val questions |")
    print("| --- | --- | --- | --- |")
    for asked in QUESTIONS:
        names, answers = vocab[QUESTIONS[asked]], vocab[asked]
        train = (train_features, *questions(train_metas, asked, names, answers))
        val = (val_features, *questions(val_metas, asked, names, answers))
        train_accuracy, val_accuracy = train_probe(train, val, len(names), len(answers), args.epochs)
        print(f"| {asked} | {train_accuracy:.3f} | {val_accuracy:.3f} | {len(val[1])} |")


if __name__ == "__main__":
    main()
