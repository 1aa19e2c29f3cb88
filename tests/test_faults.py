"""Faults: a non-finite loss never reaches the optimizer (the run stops naming the step and the samples, or skips
the batch and counts it), and a crash while saving never corrupts the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_vlm.callbacks import AtomicCheckpointIO
from lightning_vlm.cli import VLMCLI
from lightning_vlm.data.datamodule import ShardDataModule

from conftest import tokenizer_overrides
from test_contrastive_paradigm import build


def poisoned(paradigm, step: int):
    """The paradigm, its model's output on the `step`-th training batch (from 0) made NaN (a diverged batch)."""
    output, calls = paradigm.model_output, []

    def model_output(batch):
        out = output(batch)
        calls.append(1)
        if len(calls) == step + 1:
            out.image_emb = out.image_emb * float("nan")
        return out

    paradigm.model_output = model_output
    return paradigm


def fit(paradigm, root, tmp_path, steps: int = 4) -> L.Trainer:
    data = ShardDataModule(root=root, tasks={"contrastive": 1}, batch_size=8, samples_per_epoch=64)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(paradigm, data)
    return trainer


def test_a_nonfinite_loss_stops_the_run_naming_the_step_and_samples(tiny_benchmark, tmp_path):
    paradigm = poisoned(build("clip", tiny_benchmark), step=2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 \(terms \{'itc': nan\}; samples \w"):
        fit(paradigm, tiny_benchmark, tmp_path)
    assert all(torch.isfinite(param).all() for param in paradigm.parameters())


def test_a_skipped_nonfinite_batch_leaves_the_weights_as_they_were(tiny_benchmark, tmp_path):
    paradigm = poisoned(build("clip", tiny_benchmark), step=2)
    paradigm.on_nonfinite_loss = "skip"
    seen = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[batch_idx] = {name: param.detach().clone() for name, param in pl_module.named_parameters()}

    data = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1}, batch_size=8, samples_per_epoch=64)
    trainer = L.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Snapshot()])
    trainer.fit(paradigm, data)
    assert paradigm.skipped_steps == 1 and trainer.callback_metrics["train/skipped_nonfinite"] == 1
    assert len(seen) == 4  # the skipped batch still counts as a step (the optimizer found no gradient to apply)
    after_skip = seen[3]  # the batch after the poisoned one (batch 2) starts from the weights batch 2 started from
    assert all(torch.equal(value, after_skip[name]) for name, value in seen[2].items())
    assert not all(torch.equal(value, seen[2][name]) for name, value in seen[1].items())  # other steps do train
    assert all(torch.isfinite(param).all() for param in paradigm.parameters())


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def crash(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_the_command_line_writes_checkpoints_atomically(tiny_benchmark, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).parents[1] / "recipes" / "clip.yaml"
    tokenizers = tokenizer_overrides(tiny_benchmark, recipe)
    cli = VLMCLI(args=["--config", str(recipe), "--data.init_args.root", tiny_benchmark, *tokenizers], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
