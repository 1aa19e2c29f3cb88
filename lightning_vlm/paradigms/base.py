"""The one shared base of every paradigm: the training and evaluation steps, optimizer and schedule, loss logging,
and what the data side needs."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedTokenizerBase

from lightning_vlm.distributed import local_batch
from lightning_vlm.eval.suite import Evaluator
from lightning_vlm.losses.output import LossOutput, WeightedLoss
from lightning_vlm.paradigms.random_state import every_rank_random_state, random_state, set_random_state
from lightning_vlm.paradigms.sharding import shard_model
from lightning_vlm.paradigms.weights import WeightsSource, load_weights

log = logging.getLogger(__name__)


class VLMParadigm(LightningModule):
    """A `model` (plain nn.Module) and a `loss` (`WeightedLoss`): every family trains by the same step,
    ``loss(model_output(batch))``, and evaluates every split by its loss and its `evaluators`.

    A subclass says how a batch reaches its model (`model_output`) and which evaluators score a split; it
    declares what the DataModule reads (`DataConsumer`, data/datamodule.py): `tokenizer` (its text consumer's),
    `caption_tokenizer` and `image_token` where it has them, `image_mean` / `image_std` (its vision backbone's).
    AdamW over trainable parameters (no weight decay on biases, norms, scalars), linear warmup then cosine.
    ``lr_multipliers`` give named parts of ``model`` (a module or a parameter: "vision", "heads.logit_scale") their
    own parameter groups at LR × factor; the staged-freezing plan adds its phases' on top. ``init_from`` loads
    weights from checkpoints before training (`load_weights`). ``on_nonfinite_loss``: a NaN or infinite loss on any
    rank stops the run, naming the step and samples ("stop"), or skips that batch on every rank ("skip").
    """

    def __init__(self, model: nn.Module, loss: WeightedLoss, eval_max_samples: int | None = 1000,
                 lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, betas: tuple[float, float] = (0.9, 0.98),
                 init_from: list[WeightsSource] | None = None,
                 lr_multipliers: dict[str, float] | None = None,
                 on_nonfinite_loss: Literal["stop", "skip"] = "stop") -> None:
        super().__init__()
        if on_nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'stop' or 'skip', got {on_nonfinite_loss!r}")
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_steps = 0
        self.save_hyperparameters(ignore=["model", "loss"])
        self.model, self.loss = model, loss
        self.eval_max_samples = eval_max_samples
        self._evaluators: dict[int, list[Evaluator]] = {}
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.min_lr_ratio, self.betas = min_lr_ratio, betas
        self.init_from = list(init_from or [])
        self.lr_multipliers: dict[str, float] = dict(lr_multipliers or {})
        self._restored_random_state: list[dict] | None = None
        self._training_random_state: dict | None = None
        self._sharded = False
        self.flops_per_batch: int | None = None  # measured by BudgetMeter, read by Lightning's ThroughputMonitor

    # ---- the one training and evaluation step ----------------------------------------------------------------------
    def model_output(self, batch: dict[str, Any]) -> Any:
        """The model's output on a batch, what the loss reads: each family says how a batch reaches its model."""
        raise NotImplementedError(f"{type(self).__name__} must define model_output(batch)")

    def evaluators(self) -> list[Evaluator]:
        """Fresh evaluators for one eval split (its loss is always logged)."""
        return []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        losses = self.loss(self.model_output(batch))
        if not self._finite_everywhere(losses.total):
            return self._nonfinite(losses, batch)
        self.log_losses("train", losses, batch_size=len(batch["meta"]))
        return losses.total

    def _finite_everywhere(self, total: Tensor) -> bool:
        """Whether the loss is finite on every rank (one decision, so every rank skips or stops together)."""
        finite = bool(torch.isfinite(total.detach()))
        return self.trainer.strategy.reduce_boolean_decision(finite, all=True) if self._trainer else finite

    def _nonfinite(self, losses: LossOutput, batch: dict[str, Any]) -> None:
        """A non-finite loss never reaches the optimizer: stop, naming the step, the terms and the samples, or skip
        the batch (no backward, no step) and count it in ``train/skipped_nonfinite``."""
        terms = {name: float(value) for name, value in losses.terms.items()}
        keys = [meta["key"] for meta in batch["meta"]]
        shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
        where = f"non-finite loss at step {self.global_step} (terms {terms}; samples {shown})"
        if self.on_nonfinite_loss == "stop":
            raise FloatingPointError(f"{where}; set model.init_args.on_nonfinite_loss: skip to skip such batches")
        self.skipped_steps += 1
        log.warning("%s: batch skipped (%d so far)", where, self.skipped_steps)
        self.log("train/skipped_nonfinite", float(self.skipped_steps), on_step=True, batch_size=len(keys))
        return None

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        with local_batch():  # eval batches need not match across ranks; the evaluators gather what they score
            losses = self.loss(self.model_output(batch))
        self.log_losses(self.eval_split_name(dataloader_idx), losses, batch_size=len(batch["meta"]))
        for evaluator in self._evaluators.setdefault(dataloader_idx, self.evaluators()):
            if not evaluator.full:
                evaluator.update(self.model, batch)

    # ---- random state: restored on resume, untouched by evaluation ------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["random_state"] = every_rank_random_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_random_state = checkpoint.get("random_state")

    def on_train_start(self) -> None:
        """Go on drawing where the checkpoint's run stopped (each rank its own; not across a world size change)."""
        states, self._restored_random_state = self._restored_random_state, None
        if states is not None and len(states) == self.trainer.world_size:
            set_random_state(states[self.global_rank])

    def on_validation_start(self) -> None:
        """Evaluation draws leave training's random stream where it was, so how often a run validates (or whether
        a resumed run repeats a validation) never changes what it trains on."""
        self._training_random_state = random_state()

    def on_validation_end(self) -> None:
        set_random_state(self._training_random_state)

    def on_validation_epoch_end(self) -> None:
        for index, evaluators in sorted(self._evaluators.items()):
            for evaluator in evaluators:  # scored on every rank's samples, gathered: the mean over ranks is the value
                self.log_dict(evaluator.compute(self.model, self.eval_split_name(index)), add_dataloader_idx=False,
                              sync_dist=True)
                evaluator.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ---- what the sample logger draws (callbacks/sample_logger.py) ---------------------------------------------------
    def sample_outputs(self, batch: dict[str, Any]) -> list[str] | None:
        """Text the model writes for each sample (generated answers), drawn beside the images; None if it writes
        none."""
        return None

    def reconstructions(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """The batch's images with parts masked, and the model's reconstruction of them; None if it makes none."""
        return None

    # ---- what the data side reads ----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return None

    @property
    def caption_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The tokenizer of a second text consumer that reads the captions (BLIP-2's Q-Former), if any."""
        return None

    @property
    def image_token(self) -> str | None:
        """The placeholder the data side writes where each image stands, for a model that places images."""
        return None

    @property
    def image_mean(self) -> tuple[float, ...] | None:
        """The normalisation the model's vision backbone (``model.vision``) expects; None without one."""
        vision = getattr(self.model, "vision", None)
        return tuple(vision.data_config["mean"]) if vision is not None else None

    @property
    def image_std(self) -> tuple[float, ...] | None:
        vision = getattr(self.model, "vision", None)
        return tuple(vision.data_config["std"]) if vision is not None else None

    def setup(self, stage: str) -> None:
        for source in self.init_from:
            load_weights(self, source)
        self.init_from = []  # once: a resumed run restores its own checkpoint afterwards

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (FSDP2, recipes/strategies/fsdp.yaml): shard the model block by block
        (paradigms/sharding.py)."""
        if self._device_mesh is None or self._sharded:
            return
        shard_model(self.model, self.device_mesh["data_parallel"])
        self._sharded = True

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError("the LR schedule needs the run's length: set trainer.max_steps, or max_epochs with "
                             "data.samples_per_epoch (a streamed epoch has no length of its own)")
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        factor = warmup_cosine(self.warmup_steps, int(total), self.min_lr_ratio)
        # the global step, not the scheduler's own count: a plan that rebuilds the optimizer keeps the schedule
        schedule = LambdaLR(optimizer, lambda _: factor(self.trainer.global_step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def parameter_groups(self) -> list[dict]:
        """Trainable parameters grouped by part (the longest ``lr_multipliers`` prefix, else "base") and by
        decay; empty groups are left out. Groups are named ``{part}`` and ``{part}/no_decay``."""
        parts = sorted(self.lr_multipliers, key=len, reverse=True)
        groups: dict[tuple[str, bool], list] = {}
        trainable = [(name, param) for name, param in self.named_parameters() if param.requires_grad]
        half = [name for name, param in trainable if param.dtype != torch.float32]
        if half and len(half) < len(trainable):  # all half is the trainer's choice (precision="bf16-true")
            raise ValueError(f"half-precision parameters would train beside float32 ones: {half[:3]}"
                             f"{' ...' if len(half) > 3 else ''}. A half-precision LM (LanguageModel(dtype=...)) must "
                             f"stay frozen or train through LoRA; unfreeze it only in float32")
        def within(name: str, part: str) -> bool:
            return name == f"model.{part}" or name.startswith(f"model.{part}.")

        names = [name for name, _ in self.named_parameters()]
        unknown = [part for part in parts if not any(within(name, part) for name in names)]
        if unknown:
            raise ValueError(f"lr_multipliers name no part of the model: {unknown}")
        for name, param in trainable:
            part = next((p for p in parts if within(name, p)), "base")
            groups.setdefault((part, param.ndim < 2), []).append(param)
        return [{"params": params, "name": part + ("/no_decay" if no_decay else ""),
                 "lr": self.lr * self.lr_multipliers.get(part, 1.0),
                 "weight_decay": 0.0 if no_decay else self.weight_decay}
                for (part, no_decay), params in groups.items()]

    def eval_split_name(self, dataloader_idx: int) -> str:
        """The name of an eval dataloader ("val", "compositional", ...) as the DataModule lists them."""
        datamodule = getattr(self.trainer, "datamodule", None)
        names = (datamodule.test_names if self.trainer.testing else datamodule.val_names) if datamodule else []
        return names[dataloader_idx] if dataloader_idx < len(names) else f"eval{dataloader_idx}"

    def log_losses(self, stage: str, losses: LossOutput, batch_size: int) -> None:
        """Log the total, every named term and every stat under `stage/`."""
        values = {**losses.terms, **losses.stats}
        on_step = stage == "train"  # an eval split's epoch means are averaged over ranks (sync_dist)
        self.log_dict({f"{stage}/{k}": v.detach().float() for k, v in values.items()}, on_step=on_step,
                      on_epoch=not on_step, prog_bar=False, batch_size=batch_size, add_dataloader_idx=False,
                      sync_dist=not on_step)
        self.log(f"{stage}/loss", losses.total.detach(), on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=batch_size, add_dataloader_idx=False, sync_dist=not on_step)


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear from 0 to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
