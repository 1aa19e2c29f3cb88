"""BudgetMeter: the training FLOPs it measures equal the analytic count of a small MLP (a frozen layer counts its
forward, not its backward), and what a run saw is counted and written next to its logs."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from lightning_vlm.callbacks import BudgetMeter

BATCH, STEPS = 4, 3


class MLP(L.LightningModule):
    def __init__(self, freeze_first: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.net[0].requires_grad_(not freeze_first)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.net(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def batches() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(BATCH, 8, generator=generator), "meta": [{}] * BATCH,
             "pixel_values": torch.zeros(BATCH, 3, 2, 2), "attention_mask": torch.ones(BATCH, 5)}
            for _ in range(STEPS)]


@pytest.mark.parametrize("freeze_first, multiply_adds", [
    # forward 8x16 + 16x4; backward: the second layer's weight and input gradients, the first layer's weight's
    (False, 8 * 16 + 16 * 4 + 16 * 4 + 16 * 4 + 8 * 16),
    # the first layer frozen: its weight gradient, and the input gradient the second layer would pass it, go
    (True, 8 * 16 + 16 * 4 + 16 * 4),
])
def test_training_flops_are_the_analytic_count(freeze_first, multiply_adds, tmp_path):
    meter = BudgetMeter(path=str(tmp_path / "budget.json"))  # no logger, no log directory: the path is given
    trainer = L.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[meter])
    trainer.fit(MLP(freeze_first), torch.utils.data.DataLoader(batches(), batch_size=None))
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert budget["flops_per_step"] == 2 * BATCH * multiply_adds
    assert budget["train_flops"] == STEPS * 2 * BATCH * multiply_adds
    assert (budget["samples"], budget["images"], budget["text_tokens"], budget["steps"]) == (12, 12, 60, 3)
    trainable = 16 * 4 + 4 + (0 if freeze_first else 8 * 16 + 16)
    assert (budget["trainable_params"], budget["total_params"]) == (trainable, 8 * 16 + 16 + 16 * 4 + 4)
    assert budget["wall_s"] > 0 and budget["peak_memory_mib"] > 0
