"""Exact mid-epoch resume: a run stopped at step k and resumed reads exactly the batches an uninterrupted run reads,
in the same order, draws the same random numbers, and ends with the same weights; a resume whose stream changed is
refused, naming what changed. (The same on two ranks: tests/test_ddp.py.)"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_masked import build

from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.stream import StreamPosition, make_loader
from lightning_vlm.losses.masked import MaskedModelingLoss
from lightning_vlm.paradigms.masked import MaskedPretraining

BATCH, PER_EPOCH, STEPS = 8, 48, 9  # six batches an epoch: the run crosses an epoch boundary


@pytest.mark.parametrize(("per_epoch", "rank", "workers"), [(None, 0, 0), (96, 0, 0), (96, 1, 2), (96, 0, 2)])
def test_a_stream_resumed_at_batch_k_yields_the_rest_of_its_epoch(tiny_benchmark, per_epoch, rank, workers):
    """Keys, prompts (drawn by the stream's generator) and token ids: batch for batch what the epoch had left;
    a stream of unknown length (one pass, one process) as well as sized ones, on another rank, with workers."""
    dm = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1, "vqa": 1}, batch_size=BATCH, shuffle_buffer=32,
                         samples_per_epoch=per_epoch, hflip=0.5)
    stream = dm.train_dataloader().dataset
    stream.rank, stream.world_size = rank, 1 if per_epoch is None else 2
    whole = list(make_loader(stream, workers, lambda: StreamPosition(1)))
    for k in (1, 3, 4):
        rest = list(make_loader(stream, workers, lambda: StreamPosition(1, k)))  # noqa: B023 - called right here
        assert len(rest) == len(whole) - k
        assert [[m["key"], m["prompt"]] for b in rest for m in b["meta"]] == \
            [[m["key"], m["prompt"]] for b in whole[k:] for m in b["meta"]]
        assert all(torch.equal(b["input_ids"], a["input_ids"]) for b, a in zip(rest, whole[k:]))


class Interrupted(Exception):
    """The crash a test run stops with."""


class Crash(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise Interrupted


class Seen(L.Callback):
    """The sample keys of every training step."""

    def __init__(self) -> None:
        self.keys: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.append([meta["key"] for meta in batch["meta"]])


def fit(root: str, workdir: Path, callbacks: list, ckpt_path: str | None = None, workers: int = 0,
        batch_size: int = BATCH) -> MaskedPretraining:
    """A tiny FLAVA (masks and matching negatives drawn from torch's global generator) with a cosine schedule over
    `trainer.estimated_stepping_batches`, flips and a shuffle buffer, validating mid-epoch (which draws too)."""
    paradigm = MaskedPretraining(build("flava", root), MaskedModelingLoss(), lr=1e-3, warmup_steps=2)
    data = ShardDataModule(root=root, tasks={"contrastive": 1}, batch_size=batch_size, samples_per_epoch=PER_EPOCH,
                           shuffle_buffer=32, hflip=0.5, num_workers=workers)
    trainer = L.Trainer(max_steps=STEPS, limit_val_batches=1, val_check_interval=4, num_sanity_val_steps=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=workdir, callbacks=callbacks)
    trainer.fit(paradigm, data, ckpt_path=ckpt_path)
    return paradigm


def interrupted(root: str, workdir: Path, at_step: int, workers: int = 0) -> tuple[Seen, str]:
    """A run that checkpoints at `at_step` and crashes right after: what it saw, and its checkpoint."""
    seen = Seen()
    checkpoints = ModelCheckpoint(dirpath=workdir / "ckpt", every_n_train_steps=at_step, save_top_k=-1)
    with pytest.raises(Interrupted):
        fit(root, workdir, [checkpoints, Crash(at_step), seen], workers=workers)
    (path,) = (workdir / "ckpt").glob(f"*step={at_step}.ckpt")
    return seen, str(path)


@pytest.fixture(scope="module")
def uninterrupted(tiny_benchmark, tmp_path_factory):
    """Per number of workers: the keys each step of an uninterrupted run saw, and its final weights."""
    runs = {}

    def run(workers: int):
        if workers not in runs:
            seen = Seen()
            paradigm = fit(tiny_benchmark, tmp_path_factory.mktemp("whole"), [seen], workers=workers)
            runs[workers] = seen.keys, {k: v.clone() for k, v in paradigm.state_dict().items()}
        return runs[workers]

    return run


@pytest.mark.parametrize(("at_step", "workers"), [(4, 0), (6, 0), (7, 2)])
def test_a_run_resumed_mid_epoch_sees_the_same_samples_and_ends_with_the_same_weights(
        tiny_benchmark, tmp_path, uninterrupted, at_step, workers):
    """Stopped at step 4 (mid-epoch, just before a validation), 6 (an epoch's end) or 7 (mid second epoch, two
    workers): the keys of every step and every final weight equal the uninterrupted run's, bit for bit."""
    keys, weights = uninterrupted(workers)
    before, checkpoint = interrupted(tiny_benchmark, tmp_path, at_step, workers)
    after = Seen()
    resumed = fit(tiny_benchmark, tmp_path, [after], ckpt_path=checkpoint, workers=workers)
    assert before.keys + after.keys == keys
    different = [name for name, value in resumed.state_dict().items() if not torch.equal(value, weights[name])]
    assert not different


def test_a_mid_epoch_resume_with_another_stream_is_refused_naming_what_changed(tiny_benchmark, tmp_path):
    _, checkpoint = interrupted(tiny_benchmark, tmp_path, 4)
    with pytest.raises(ValueError, match=r"cannot resume mid-epoch \(epoch 0, batch 4\).*num_workers 0 -> 2"):
        fit(tiny_benchmark, tmp_path, [], ckpt_path=checkpoint, workers=2)
    with pytest.raises(ValueError, match=r"batch_size 8 -> 4"):
        fit(tiny_benchmark, tmp_path, [], ckpt_path=checkpoint, batch_size=4)
    state = torch.load(checkpoint, weights_only=False)
    state["ShardDataModule"]["train_stream"]["depends_on"]["world_size"] = 2  # as a two-rank run writes it
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match=r"world_size 2 -> 1"):
        fit(tiny_benchmark, tmp_path, [], ckpt_path=checkpoint)
