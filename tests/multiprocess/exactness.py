"""One rank of a two-process CPU (gloo) run that checks exactness; launched by tests/test_ddp.py with
torch.distributed.run. Each rank saves what it saw and its final weights to OUT/rank{R}.pt.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/multiprocess/exactness.py CASE ROOT OUT

CASE "resume": a tiny FLAVA fit straight through, then the same fit stopped mid-epoch and resumed from its
checkpoint (the sample keys of every step on this rank, and the final weights, of both).
CASE "batch_split": a tiny CLIP fit on this rank's BATCH rows of each global batch, which `one_process` reads
whole (2 x BATCH rows) in one process.
CASE "fsdp": a tiny LLaVA through a staged plan (vision frozen; the LM frozen, then trained through LoRA) under
FSDP2Strategy and under DDP on the same data: both write a full checkpoint (OUT/fsdp.ckpt, OUT/ddp.ckpt); each rank
saves how much of the FSDP model it holds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))

from multiprocess.staged_fit import llava_lora  # noqa: E402
from test_masked import build as build_masked  # noqa: E402

from lightning_vlm.callbacks import StagedFreezing  # noqa: E402
from lightning_vlm.data import ShardDataModule  # noqa: E402
from lightning_vlm.encoders import TextEncoder, VisionEncoder  # noqa: E402
from lightning_vlm.losses import CLIPLoss, MaskedModelingLoss  # noqa: E402
from lightning_vlm.models import DualEncoder  # noqa: E402
from lightning_vlm.paradigms import Contrastive, MaskedPretraining  # noqa: E402
from lightning_vlm.paradigms.sharding import FSDP2Strategy  # noqa: E402

BATCH, STEPS, STOP_AT = 4, 3, 7
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}


class StopAt(L.Callback):
    """Ends the fit after `step` steps, as a preempted job stops (the schedule still plans the whole run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.global_step >= self.step


class Seen(L.Callback):
    def __init__(self) -> None:
        self.keys: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys.append([meta["key"] for meta in batch["meta"]])


def resume(root: str, out: Path) -> dict:
    """Uninterrupted, then stopped at STOP_AT (mid second epoch) and resumed: 6 batches an epoch, 9 steps."""

    def fit(callbacks: list, ckpt_path: str | None = None) -> MaskedPretraining:
        torch.manual_seed(0)
        paradigm = MaskedPretraining(build_masked("flava", root), MaskedModelingLoss(), lr=1e-3, warmup_steps=2)
        data = ShardDataModule(root=root, tasks={"contrastive": 1}, batch_size=8, samples_per_epoch=48,
                               shuffle_buffer=32, hflip=0.5)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true",
                            max_steps=9, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=out, callbacks=callbacks)
        trainer.fit(paradigm, data, ckpt_path=ckpt_path)
        return paradigm

    whole, before, after = Seen(), Seen(), Seen()
    straight = fit([whole])
    fit([before, StopAt(STOP_AT), ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=STOP_AT)])
    (checkpoint,) = (out / "ckpt").glob(f"*step={STOP_AT}.ckpt")
    resumed = fit([after], str(checkpoint))
    return {"whole": whole.keys, "resumed": before.keys + after.keys,
            "straight_state": straight.state_dict(), "resumed_state": resumed.state_dict()}


def clip(root: str) -> Contrastive:
    """A tiny CLIP trained by plain SGD: unlike Adam's, its steps scale with the gradient, so a gradient summed
    instead of averaged over ranks (or a loss over the local batch only) shows in the weights."""
    torch.manual_seed(0)
    model = DualEncoder(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                        TextEncoder(tokenizer=root, pooling="mean", config=NO_DROPOUT), embed_dim=32)
    paradigm = Contrastive(model, CLIPLoss())
    paradigm.configure_optimizers = lambda: torch.optim.SGD(paradigm.parameters(), lr=0.1)
    return paradigm


def global_batches(root: str) -> list[dict]:
    """STEPS batches of 2 x BATCH pairs, in a fixed order (the val split, read as evaluation reads it)."""
    data = ShardDataModule(root=root, tasks={"contrastive": 1}, batch_size=2 * BATCH, num_workers=0)
    data.setup()
    loader = iter(data.eval_loader("val"))
    return [next(loader) for _ in range(STEPS)]


def rows(batch: dict, rank: int) -> dict:
    """This rank's BATCH rows of a global batch."""
    part = slice(rank * BATCH, (rank + 1) * BATCH)
    return {key: value[part] if isinstance(value, (torch.Tensor, list)) else value for key, value in batch.items()}


def fit_batches(paradigm: Contrastive, batches: list[dict], devices: int) -> dict:
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_steps=STEPS, use_distributed_sampler=False,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(paradigm, DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch))
    return {name: param.detach().clone() for name, param in paradigm.named_parameters()}


def one_process(root: str) -> dict:
    """The reference: the global batches whole, in one process."""
    return fit_batches(clip(root), global_batches(root), devices=1)


def batch_split(root: str, out: Path) -> dict:
    rank = int(os.environ["RANK"])
    return {"state": fit_batches(clip(root), [rows(b, rank) for b in global_batches(root)], devices=2)}


def fsdp(root: str, out: Path) -> dict:
    held = {}
    for name, strategy in [("fsdp", FSDP2Strategy(save_distributed_checkpoint=False)), ("ddp", "ddp")]:
        torch.manual_seed(0)
        paradigm, phases, tasks = llava_lora(root)
        data = ShardDataModule(root=root, tasks=tasks, batch_size=4, num_workers=0)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=5, limit_val_batches=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[StagedFreezing(phases)], default_root_dir=out)
        trainer.fit(paradigm, data)
        trainer.save_checkpoint(out / f"{name}.ckpt")
        held[name] = (sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in paradigm.parameters()),
                      sum(p.numel() for p in paradigm.parameters()))
    return {"held": held}


if __name__ == "__main__":
    case, root, out = sys.argv[1:4]
    result = {"resume": resume, "batch_split": batch_split, "fsdp": fsdp}[case](root, Path(out))
    torch.save(result, Path(out) / f"rank{os.environ['RANK']}.pt")
