"""Keeps what ``predict`` returns: generated answers and captions as JSONL rows (key, prompt, answer), image and text
embeddings as one safetensors file (a tensor per kind, rows in the order of the ``keys`` in its metadata).

``python -m lightning_vlm predict --config R --ckpt_path C --trainer.callbacks+=lightning_vlm.callbacks.PredictionWriter
--trainer.callbacks.path out.jsonl`` (``out.safetensors`` for a contrastive model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions of a ``predict`` run to `path`: JSONL when the paradigm's ``predict_step`` returns
    per-sample lists (a row per sample, one field per list), safetensors when it returns tensors (each tensor
    under its name, the ``key`` list as JSON in the metadata).

    Ranks: each rank writes its own predictions to ``path.rankN`` when the epoch ends; after a barrier rank 0
    concatenates the parts in rank order into `path` and removes them (one process writes `path` directly).
    """

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = [batch for group in predictions for batch in (group if isinstance(group, list) else [group])]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if trainer.world_size == 1:
            write(batches, self.path)
            return
        part = self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}")
        as_tensors = write(batches, part)
        trainer.strategy.barrier("prediction parts written")
        if trainer.is_global_zero:
            parts = [self.path.with_name(f"{self.path.name}.rank{rank}") for rank in range(trainer.world_size)]
            merge([done for done in parts if done.stat().st_size], self.path, as_tensors)
            for done in parts:
                done.unlink()
        trainer.strategy.barrier("predictions merged")


def write(batches: list[dict[str, Any]], path: Path) -> bool:
    """Batches of predictions into one file: safetensors if they hold tensors (returns True), else JSONL."""
    if batches and any(isinstance(value, Tensor) for value in batches[0].values()):
        names = [name for name, value in batches[0].items() if isinstance(value, Tensor)]
        tensors = {name: torch.cat([batch[name].detach().float().cpu() for batch in batches]) for name in names}
        keys = [key for batch in batches for key in batch["key"]]
        save_file(tensors, path, metadata={"keys": json.dumps(keys)})
        return True
    with path.open("w") as file:
        for batch in batches:
            for row in zip(*batch.values()):
                file.write(json.dumps(dict(zip(batch, row))) + "\n")
    return False


def merge(parts: list[Path], path: Path, as_tensors: bool) -> None:
    """Per-rank files written by `write` concatenated, in order, into one of the same format."""
    if not as_tensors:
        path.write_text("".join(part.read_text() for part in parts))
        return
    loaded = [(load_file(part), read_keys(part)) for part in parts]
    tensors = {name: torch.cat([tensors[name] for tensors, _ in loaded]) for name in loaded[0][0]}
    save_file(tensors, path, metadata={"keys": json.dumps([key for _, keys in loaded for key in keys])})


def read_keys(path: Path) -> list[str]:
    """The sample keys of a safetensors predictions file, in the order of its rows."""
    with safe_open(path, "pt") as file:
        return json.loads(file.metadata()["keys"])
