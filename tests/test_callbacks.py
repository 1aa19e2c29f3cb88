"""Callbacks in a real fit: bad data counted in metrics; the sample grid and its captions written to TensorBoard."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_vlm.callbacks import BadDataLogger, Phase, SampleImageLogger, StagedFreezing
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
    trainer = L.Trainer(max_steps=6, val_check_interval=6, check_val_every_n_epoch=None, limit_val_batches=1,
                        logger=logger, log_every_n_steps=1,
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


class TermRecorder(L.Callback):
    """The weighted loss terms of every training step (the ones the paradigm logs)."""

    def __init__(self) -> None:
        self.terms: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.terms.append({name: float(value) for name, value in trainer.callback_metrics.items()
                           if name.startswith("train/") and name.removeprefix("train/") in pl_module.loss.weights})


def test_a_phase_sets_the_loss_weights_of_any_family(tiny_benchmark, tmp_path):
    """SigLIP's loss: the phase from step 2 weighs "sigmoid" 0.25, and the logged term follows; the plan is checked
    before the first step."""
    paradigm = build("siglip", tiny_benchmark)
    plan = StagedFreezing([Phase(start_step=0), Phase(start_step=2, loss_weights={"sigmoid": 0.25})])
    recorder = TermRecorder()
    dm = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1}, batch_size=8, samples_per_epoch=64)
    trainer = L.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[plan, recorder], default_root_dir=tmp_path)
    trainer.fit(paradigm, dm)
    assert paradigm.loss.weights == {"sigmoid": 0.25} and len(recorder.terms) == 4
    before, after = recorder.terms[1]["train/sigmoid"], recorder.terms[2]["train/sigmoid"]
    assert after < 0.5 * before  # the same loss, a quarter of its weight (it moves far less than 2x in one step)


def test_a_phase_naming_an_unknown_term_or_part_fails_before_training(tiny_benchmark, tmp_path):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1}, batch_size=8, samples_per_epoch=64)
    for phase, message in ((Phase(start_step=3, loss_weights={"itc": 1.0}), r"unknown terms \['itc'\].*'sigmoid'"),
                           (Phase(start_step=3, freeze=["visoin"]), r"no part 'visoin'.*'vision'")):
        paradigm = build("siglip", tiny_benchmark)
        before = {name: param.clone() for name, param in paradigm.named_parameters()}
        trainer = L.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, callbacks=[StagedFreezing([Phase(start_step=0), phase])],
                            default_root_dir=tmp_path)
        with pytest.raises(ValueError, match=message):
            trainer.fit(paradigm, dm)
        assert trainer.global_step == 0
        assert all(torch.equal(param, before[name]) for name, param in paradigm.named_parameters())
