"""Data: the streaming pipeline (sources, stream, transforms, task formatting, collate, the DataModule); the
synthetic benchmark in data/synthetic/, the command-line tools in data/tools/."""

from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.sources import ShardSource

__all__ = ["ShardDataModule", "ShardSource"]
