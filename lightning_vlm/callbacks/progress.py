"""Progress for logs: when stdout is not a terminal (nohup, SLURM, CI), a progress bar redraws itself into one
endless line, so the CLI uses this instead: one plain line every ``log_every_n_steps`` training steps (step,
samples/s, loss, ETA) and one per validation with its metrics."""

from __future__ import annotations

import datetime
import time
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar


class LineProgress(ProgressBar):
    """Plain progress lines on rank 0 (see the module docstring); a Lightning progress bar, so it replaces the
    default one."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started, self._first_step, self._samples = 0.0, 0, 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started, self._first_step, self._samples = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += len(batch["meta"])
        step = trainer.global_step
        if not (self._enabled and trainer.is_global_zero) or step % max(1, trainer.log_every_n_steps):
            return
        elapsed = time.perf_counter() - self._started
        done = step - self._first_step
        total = int(trainer.estimated_stepping_batches)
        eta = datetime.timedelta(seconds=round((total - step) * elapsed / done)) if done else "?"
        loss = outputs["loss"].item() if isinstance(outputs, dict) and "loss" in outputs else float("nan")
        print(f"step {step}/{total} | {self._samples / elapsed:.1f} samples/s | loss {loss:.4f} | ETA {eta}",
              flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        metrics = [(name, value) for name, value in trainer.callback_metrics.items()
                   if not name.startswith(("train/", "budget/", "data/")) and value.numel() == 1]
        # each split's loss first, then the val split's metrics, then the other splits' (the line keeps 12)
        metrics.sort(key=lambda metric: (not metric[0].endswith("/loss"), not metric[0].startswith("val/"), metric[0]))
        print(f"validation at step {trainer.global_step}: "
              + ", ".join(f"{name} {float(value):.4g}" for name, value in metrics[:12]), flush=True)
