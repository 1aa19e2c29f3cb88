"""The one shared base of every paradigm: optimizer and schedule, loss logging, and what the data side needs."""

from __future__ import annotations

import math

import torch
from lightning import LightningModule
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerBase

from lightning_vlm.losses.output import LossOutput


class VLMParadigm(LightningModule):
    """AdamW over trainable parameters (no weight decay on biases, norms, scalars), linear warmup then cosine.

    Subclasses hold `model` (plain nn.Module) and `loss`; they declare `tokenizer` (their text consumer's) and
    `image_mean` / `image_std` (their vision backbone's) so the DataModule prepares data the way they read it.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, betas: tuple[float, float] = (0.9, 0.98)) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.min_lr_ratio, self.betas = min_lr_ratio, betas

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return None

    def configure_optimizers(self):
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError("the LR schedule needs the run's length: set trainer.max_steps, or max_epochs with "
                             "data.samples_per_epoch (a streamed epoch has no length of its own)")
        schedule = LambdaLR(optimizer, warmup_cosine(self.warmup_steps, int(total), self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def log_losses(self, stage: str, losses: LossOutput, batch_size: int) -> None:
        """Log the total, every named term and every stat under `stage/`."""
        values = {**losses.terms, **losses.stats}
        on_step = stage == "train"
        self.log_dict({f"{stage}/{k}": v.detach().float() for k, v in values.items()}, on_step=on_step,
                      on_epoch=not on_step, prog_bar=False, batch_size=batch_size, add_dataloader_idx=False)
        self.log(f"{stage}/loss", losses.total.detach(), on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=batch_size, add_dataloader_idx=False)


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear from 0 to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
