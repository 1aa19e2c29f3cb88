"""Staged freezing: a declarative plan of training phases, shared by every paradigm.

Each phase starts at a global step or an epoch and names parts of the model (dotted paths under the
paradigm's ``model``) to freeze, unfreeze or train through LoRA adapters, per-part learning-rate multipliers
and the weights of the paradigm's loss terms (``loss.weights``, any family). Every phase's parts and term names
are checked when fitting starts, so a typo fails before the first step, naming what the model and the loss have.
Frozen parts are in eval mode and out of the optimizer; entering a phase rebuilds the optimizer (Adam moments of
parameters still trained are carried over) with one parameter group per named part. The LR schedule is a function
of the global step, so it runs on across phases.

Under DDP, a phase that changes which parameters train re-wraps the model: DDP averages the gradients of exactly
the parameters that required grad when it wrapped the model, so without a new wrapper every rank would train its
own copy of what the phase unfroze or added. Re-wrapping (rather than all-reducing the new gradients by hand) keeps
DDP's bucketing and its overlap of communication with the backward pass; it happens once per phase change.

LoRA adapters named anywhere in the plan are injected when fitting starts, inert (B = 0) and frozen until
their phase: the function is unchanged until then, exactly as if they were added at that step, and a
resumed run's checkpoint always matches the module layout. The plan and the current phase are saved in
checkpoints; a resumed run replays the phases up to where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import peft
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """One phase of the plan; it starts at ``start_step`` (global step) or ``start_epoch``, whichever is given."""

    start_step: int | None = None
    start_epoch: int | None = None
    freeze: list[str] = field(default_factory=list)
    unfreeze: list[str] = field(default_factory=list)
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.start_step is None) == (self.start_epoch is None):
            raise ValueError(f"a phase starts at exactly one of start_step or start_epoch: {self}")


class StagedFreezing(Callback):
    """Applies `phases` (in order of their start) to the paradigm's ``model``; see the module docstring."""

    def __init__(self, phases: list[Phase]) -> None:
        if not phases:
            raise ValueError("StagedFreezing needs at least one phase")
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in phases]
        self.current = -1
        self.frozen: set[str] = set()
        self._module: LightningModule | None = None
        self._wrapped_phase = -1  # the phase whose trainable parameters the DDP wrapper averages

    # ---- Lightning hooks ------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Inject the plan's LoRA and enter the first phase, for every stage: a test or predict run from a checkpoint
        needs the adapters to load its weights and the phase to load the callback's state."""
        if self._module is not None:
            return
        self._module = pl_module
        self._check_plan()
        for path, config in self._lora_targets().items():
            inject_lora(self._part(path), config)
        self._enter(0)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._wrapped_phase = self.current  # the strategy has just wrapped the model; a resume may move on next

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        due = self._due(trainer.global_step, trainer.current_epoch)
        if due > self.current:
            self._enter(due)
            self._rebuild_optimizer(trainer)
        if self.current != self._wrapped_phase:  # only entering a phase changes what trains
            self._rewrap(trainer)
        self._keep_frozen_in_eval()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._keep_frozen_in_eval()

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.current, "plan": [dataclasses.asdict(p) for p in self.phases]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["plan"] != [dataclasses.asdict(p) for p in self.phases]:
            log.warning("resuming with a staged-freezing plan that differs from the checkpoint's")
        if self._module is None:
            raise RuntimeError("StagedFreezing.load_state_dict before setup: restore through a Trainer (ckpt_path=)")
        self.current, self.frozen = -1, set()
        self._enter(state_dict["phase"])

    def apply(self, pl_module: LightningModule, index: int = -1) -> None:
        """Put `pl_module` in phase `index` (default the last) outside a Trainer, LoRA injected and parts frozen as
        a fit would have them there: for profiling and notebooks."""
        self.setup(None, pl_module, "fit")
        self._enter(index % len(self.phases))

    # ---- the plan ---------------------------------------------------------------------------------------------------
    def _due(self, step: int, epoch: int) -> int:
        """Index of the last phase whose start has been reached."""
        reached = [i for i, p in enumerate(self.phases)
                   if (p.start_step is not None and step >= p.start_step)
                   or (p.start_epoch is not None and epoch >= p.start_epoch)]
        return max(reached, default=0)

    def _enter(self, index: int) -> None:
        """Apply every phase after the current one up to ``index``, in order (a resume replays them all)."""
        for i in range(self.current + 1, index + 1):
            phase = self.phases[i]
            for path in phase.freeze:
                self._part(path).requires_grad_(False)
                self.frozen.add(path)
            for path in phase.unfreeze:
                self._part(path).requires_grad_(True).train()
                self.frozen.discard(path)
            for path in phase.lora:
                for name, param in self._part(path).train().named_parameters():
                    param.requires_grad = "lora_" in name
                self.frozen.discard(path)
            self._module.lr_multipliers = {**self._module.lr_multipliers, **phase.lr_multipliers}
            self._module.loss.set_weights(phase.loss_weights)
            log.info("staged freezing: entering phase %d %s", i, phase)
        self.current = max(self.current, index)
        self._keep_frozen_in_eval()

    def _check_plan(self) -> None:
        """Every part every phase names exists, and every loss term it weighs."""
        for phase in self.phases:
            for path in [*phase.freeze, *phase.unfreeze, *phase.lora]:
                self._part(path)
            try:
                self._module.loss.check_weights(phase.loss_weights)
            except ValueError as err:
                raise ValueError(f"staged freezing: {err}") from None

    def _keep_frozen_in_eval(self) -> None:
        for path in self.frozen:
            self._part(path).eval()

    def _rebuild_optimizer(self, trainer: Trainer) -> None:
        """New optimizer and schedule from the paradigm's configure_optimizers; moments of kept params carried."""
        old = {id(p): s for opt in trainer.optimizers for p, s in opt.state.items()}
        trainer.strategy.setup_optimizers(trainer)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) in old:
                        optimizer.state[param] = old[id(param)]

    def _rewrap(self, trainer: Trainer) -> None:
        """A new DDP wrapper over what trains now (see the module docstring); other strategies need none."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
            log.info("staged freezing: DDP re-wrapped for phase %d", self.current)
        self._wrapped_phase = self.current

    def _lora_targets(self) -> dict[str, dict[str, Any]]:
        targets: dict[str, dict[str, Any]] = {}
        for phase in self.phases:
            targets.update(phase.lora)
        return targets

    def _part(self, path: str) -> nn.Module:
        try:
            return self._module.model.get_submodule(path)
        except AttributeError as err:
            names = [n for n, _ in self._module.model.named_children()]
            raise ValueError(f"staged freezing: the model has no part {path!r} (top-level parts: {names})") from err


def inject_lora(module: nn.Module, config: dict[str, Any]) -> None:
    """Add LoRA adapters (peft) to ``module`` in place, inert and frozen: their phase makes them trainable."""
    add = getattr(module, "add_lora", None)
    if add is not None:  # a LanguageModel knows its own default targets
        add(**config)
    else:
        peft.inject_adapter_in_model(peft.LoraConfig(**config), module)
    for name, param in module.named_parameters():
        if "lora_" in name:
            param.requires_grad = False
