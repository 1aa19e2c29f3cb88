"""Logs how many samples the data pipeline skipped (corrupt image, missing key) and how many tar reads failed."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer


class BadDataLogger(Callback):
    """Sums the per-batch counts the DataModule's workers attach and logs the running totals.

    Totals are restored on resume, so the metric counts the whole run, over all ranks.
    """

    def __init__(self) -> None:
        self.skipped = 0
        self.read_errors = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not isinstance(batch, dict):
            return
        self.skipped += int(batch.get("num_skipped", 0))
        self.read_errors += int(batch.get("num_read_errors", 0))
        pl_module.log_dict({"data/skipped_samples": float(self.skipped), "data/read_errors": float(self.read_errors)},
                           reduce_fx="sum", sync_dist=True, batch_size=1)  # every rank's running total, summed

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "read_errors": self.read_errors}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.read_errors = state_dict["skipped"], state_dict["read_errors"]
