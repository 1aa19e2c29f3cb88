"""What a run spent, so runs of different paradigms compare on one budget: samples, images and text tokens seen,
trainable and total parameters, training FLOPs, wall time and peak memory.

FLOPs come from torch's FLOP counter held around one whole training step (forward and backward as they ran), so a
frozen part counts its forward and the gradient it passes to its inputs, never a weight gradient; the step is the
second (the first may build lazy state). The counts are global (every rank's), carried through a resume, logged
under ``budget/`` and written as JSON when training ends, to `path` or else ``budget.json`` in the trainer's
log directory, beside the run's TensorBoard events (the compare command reads it; a run without a logger writes it
only to a given `path`). The
measured FLOPs per step are also set as the module's ``flops_per_batch``, which Lightning's ThroughputMonitor
turns into FLOPs/s and, where it knows the device's peak, MFU.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch.utils.flop_counter import FlopCounterMode

MEASURED_STEP = 1


class BudgetMeter(Callback):
    """Counts what the run spent (see the module docstring); `path` (default: the log directory's budget.json)
    receives the totals as JSON."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.totals = {"samples": 0, "images": 0, "text_tokens": 0, "steps": 0, "wall_s": 0.0}
        self.flops_per_step: int | None = None
        self._counter: FlopCounterMode | None = None
        self._started = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.flops_per_step is None and trainer.global_step == MEASURED_STEP and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        self._stop_counting(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch: Any,
                           batch_idx: int) -> None:
        self._stop_counting(trainer, pl_module)  # a skipped (non-finite) step has no optimizer step
        world = trainer.world_size
        self.totals["samples"] += len(batch["meta"]) * world
        self.totals["images"] += int(batch["pixel_values"].shape[0]) * world
        self.totals["text_tokens"] += int(batch["attention_mask"].sum()) * world
        self.totals["steps"] = trainer.global_step
        pl_module.log_dict({f"budget/{key}": float(self.totals[key]) for key in ("samples", "text_tokens")},
                           batch_size=1, rank_zero_only=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.totals["wall_s"] += time.perf_counter() - self._started
        self._started = time.perf_counter()
        if self.path is None and trainer.logger is None:
            return  # a run without a logger has no log directory to write beside (not the working directory)
        log_dir = trainer.log_dir or trainer.default_root_dir  # on every rank: Lightning broadcasts it
        path = Path(self.path or Path(log_dir) / "budget.json")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.summary(pl_module), indent=1))

    def summary(self, pl_module: LightningModule) -> dict[str, float | int | None]:
        """The totals, parameters, FLOPs (per step and over the run) and peak memory."""
        params = list(pl_module.parameters())
        per_step = self.flops_per_step
        return {
            **self.totals,
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params),
            "flops_per_step": per_step,
            "train_flops": per_step * self.totals["steps"] if per_step is not None else None,
            "peak_memory_mib": peak_memory_mib(),
        }

    def state_dict(self) -> dict:
        return {"totals": self.totals, "flops_per_step": self.flops_per_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.totals, self.flops_per_step = dict(state_dict["totals"]), state_dict["flops_per_step"]

    def _stop_counting(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counter is None:
            return
        self._counter.__exit__(None, None, None)
        self.flops_per_step = self._counter.get_total_flops() * trainer.world_size
        self._counter = None
        pl_module.flops_per_batch = self.flops_per_step // trainer.world_size  # ThroughputMonitor's, per device


def peak_memory_mib() -> float:
    """Peak GPU memory allocated when on a GPU, else the process's peak resident memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
