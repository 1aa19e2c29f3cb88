"""Callbacks in a real fit: bad data counted in metrics; the sample grid and its captions written to TensorBoard."""

from __future__ import annotations

import shutil

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_vlm.callbacks import BadDataLogger, SampleImageLogger
from lightning_vlm.data.datamodule import ShardDataModule
from test_contrastive_paradigm import build
from test_datamodule import _tar


def test_bad_samples_are_logged_and_samples_drawn_to_tensorboard(tiny_benchmark, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(f"{tiny_benchmark}/train/shard-000000.tar", shards / "a.tar")
    _tar(shards / "b.tar", [("bad0.jpg", b"not a jpeg"), ("bad0.txt", b"x"), ("bad1.jpg", b"\xff\xd8")])
    dm = ShardDataModule(root=tiny_benchmark, train=str(shards), tasks={"contrastive": 1}, batch_size=16,
                         shuffle_buffer=0, samples_per_epoch=64)
    logger = TensorBoardLogger(tmp_path / "runs")
    trainer = L.Trainer(max_steps=6, val_check_interval=6, check_val_every_n_epoch=None, limit_val_batches=1, logger=logger, log_every_n_steps=1,
                        callbacks=[BadDataLogger(), SampleImageLogger(num_samples=4)], enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(build("clip", tiny_benchmark), dm)
    # a pass over both shards meets the 2 bad samples (corrupt jpg; jpg without txt); 6 steps x 16 > 64 good ones
    assert trainer.callback_metrics["data/skipped_samples"] >= 2
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "samples" in events.Tags()["images"]
    image = events.Images("samples")[0]
    assert image.width == 4 * 160 and image.height == 160 + 80
