"""One cell of a comparison, an entry under one seed: its recipe rewritten to the budget, trained as an ordinary
fit, then scored by an ordinary test run; both are subprocesses of ``python -m lightning_vlm``, so a multi-GPU
machine runs a cell as it runs any recipe, and a crash in one cell leaves the others."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from lightning import Callback, LightningModule, Trainer

from lightning_vlm.cli import read_recipe
from lightning_vlm.compare.config import Comparison, Entry

CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


class FinalCheckpoint(Callback):
    """Writes the trained weights to `path` when training ends (what the cell's test run scores)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.save_checkpoint(self.path)


class MetricsWriter(Callback):
    """Writes every metric a test run logged to `path` as JSON (rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
            Path(self.path).write_text(json.dumps(metrics, indent=1, sort_keys=True))


def set_dotted(config: dict, key: str, value: Any) -> None:
    """``config["a"]["b"]["c"] = value`` for key "a.b.c" (missing levels made)."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def cell_name(entry: Entry, seed: int) -> str:
    return f"{entry.label}-seed{seed}"


def cell_config(comparison: Comparison, entry: Entry, seed: int, out: Path) -> dict:
    """The entry's recipe with its overrides, trained for the budget's samples from this seed (the initialisation and
    the data stream's order and augmentation both): staged phases compressed in proportion, checkpoints and logs
    inside `out`; it validates while training only at the comparison's `curve_points` evenly spaced steps (in place
    of the recipe's val_check_interval), which its curves plot."""
    config = read_recipe(comparison.recipe_path(entry))
    for key, value in entry.overrides.items():
        set_dotted(config, key, value)
    trainer, data = config.setdefault("trainer", {}), config["data"]["init_args"]
    global_batch = data.get("batch_size", 32) * _int(trainer.get("devices"), 1) * _int(trainer.get("num_nodes"), 1) \
        * trainer.get("accumulate_grad_batches", 1)
    steps = max(1, math.ceil(comparison.samples / global_batch))
    _compress_phases(trainer, _recipe_steps(trainer, data), steps)
    cell = out / "cells" / cell_name(entry, seed)
    validation = {"limit_val_batches": 0}
    if comparison.curve_points > 0:  # Lightning counts the interval in batches, not optimizer steps
        every = max(1, steps // comparison.curve_points) * trainer.get("accumulate_grad_batches", 1)
        validation = {"val_check_interval": every, "check_val_every_n_epoch": None}
    trainer.update(max_steps=steps, max_epochs=-1, num_sanity_val_steps=0, **validation,
                   logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": str(out / "tb"), "name": entry.label, "version": f"seed{seed}"}})
    trainer["callbacks"] = [c for c in trainer.get("callbacks", []) if c["class_path"] != CHECKPOINT] + [
        {"class_path": CHECKPOINT, "init_args": {"dirpath": str(cell), "filename": "last", "save_top_k": 1,
                                                "every_n_train_steps": max(1, steps // 5),
                                                "enable_version_counter": False}},
        {"class_path": f"{__name__}.FinalCheckpoint", "init_args": {"path": str(cell / "final.ckpt")}},
        {"class_path": f"{__name__}.MetricsWriter", "init_args": {"path": str(cell / "metrics.json")}},
    ]
    config["seed_everything"] = seed
    data["seed"] = seed  # the stream's own seed (order, augmentation): a fine-tune whose weights all come from a
    # checkpoint would otherwise train identically under every seed
    config["model"]["init_args"]["eval_max_samples"] = comparison.eval_max_samples
    return config


def train_cell(config_path: Path, cell: Path) -> None:
    """Fit the cell, resuming from its last periodic checkpoint when an earlier run was interrupted."""
    resume = ["--ckpt_path", str(cell / "last.ckpt")] if (cell / "last.ckpt").is_file() else []
    _run(["fit", "--config", str(config_path), *resume], cell / "fit.log")


def test_cell(config_path: Path, cell: Path, log: str = "test.log") -> None:
    """Score the cell's final weights on the data's test splits (its MetricsWriter keeps what was logged)."""
    _run(["test", "--config", str(config_path), "--ckpt_path", str(cell / "final.ckpt"),
          "--model.init_args.init_from", "[]"], cell / log)


def blind_config(config: dict, cell: Path) -> dict:
    """The cell scored with its evaluation images zeroed, its metrics written to ``blind.json``."""
    blind = copy.deepcopy(config)
    blind["data"]["init_args"]["blind"] = True
    for callback in blind["trainer"]["callbacks"]:
        if callback["class_path"].endswith(".MetricsWriter"):
            callback["init_args"]["path"] = str(cell / "blind.json")
    return blind


def probe_cell(config_path: Path, cell: Path, probe: dict[str, int]) -> None:
    """The frozen-feature probe of the cell's final image encoder on the test splits, into ``probe.json``."""
    _run(["probe", "--config", str(config_path), "--checkpoint", str(cell / "final.ckpt"),
          *[arg for key, value in probe.items() for arg in (f"--{key.replace('_', '-')}", str(value))],
          "--out", str(cell / "probe.json")], cell / "probe.log")


def write_config(config: dict, cell: Path, name: str = "config.yaml") -> Path:
    cell.mkdir(parents=True, exist_ok=True)
    path = cell / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(args: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as output:
        result = subprocess.run([sys.executable, "-m", "lightning_vlm", *args], stdout=output,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"`python -m lightning_vlm {args[0]}` failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - started


def _recipe_steps(trainer: dict, data: dict) -> int | None:
    """How many steps the recipe plans (its max_steps, or epochs of samples_per_epoch), when it says."""
    if trainer.get("max_steps", -1) > 0:
        return trainer["max_steps"]
    if trainer.get("max_epochs") and data.get("samples_per_epoch"):
        return trainer["max_epochs"] * data["samples_per_epoch"] // data.get("batch_size", 32)
    return None


def _compress_phases(trainer: dict, recipe_steps: int | None, steps: int) -> None:
    """Staged phases start at the same fraction of the budget as of the recipe's run (epochs made steps)."""
    for callback in trainer.get("callbacks", []):
        if not callback["class_path"].endswith("StagedFreezing"):
            continue
        if recipe_steps is None:
            raise ValueError("a staged recipe in a comparison needs trainer.max_steps (or max_epochs with "
                             "data.samples_per_epoch) to place its phases within the budget")
        per_epoch = recipe_steps / max(1, trainer.get("max_epochs") or 1)
        for phase in callback["init_args"]["phases"]:
            start = phase.pop("start_step", None)
            epoch = phase.pop("start_epoch", None)
            start = start if start is not None else epoch * per_epoch
            phase["start_step"] = round(start * steps / recipe_steps)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) else default
