"""Training samples/s of one process against two DDP processes (CPU, gloo) at the same global batch, for one recipe
per family, measured side by side in one run; the ratio is what a second process buys on this machine.

    python benchmarks/ddp_throughput.py [--recipes clip flava blip2 llava] [--global-batch 32] [--steps 12]

Each recipe runs from scratch (no init_from) on its own default data (generated on first use), float32, without
validation or checkpoints, with the torch threads split evenly between the processes (1 x T threads against
2 x T/2). Steps after the first quarter are timed (the first ones load shards and warm kernels). On a GPU
machine, `--accelerator gpu` compares one GPU with two the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import yaml

from lightning_vlm.cli import read_recipe

RECIPES = Path(__file__).parents[1] / "recipes"


class StepClock(L.Callback):
    """Wall time at the end of every training step, written by rank 0 to ``path`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path, self.times = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.times))


def config(recipe: str, processes: int, global_batch: int, steps: int, accelerator: str, clock: str) -> dict:
    """The recipe shortened to `steps` of `global_batch` samples split over `processes`, nothing but training."""
    cfg = read_recipe(RECIPES / f"{recipe}.yaml")
    cfg["trainer"].update(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, precision="32-true",
                          enable_progress_bar=False, enable_checkpointing=False,
                          logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(Path(clock).parent)}},
                          accelerator=accelerator, devices=processes, strategy="ddp_find_unused_parameters_true")
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"].get("callbacks", [])
                                   if c["class_path"].endswith("StagedFreezing")]
    cfg["trainer"]["callbacks"].append({"class_path": "ddp_throughput.StepClock", "init_args": {"path": clock}})
    cfg["model"]["init_args"]["init_from"] = []
    cfg["data"]["init_args"].update(batch_size=global_batch // processes, num_workers=0,
                                    samples_per_epoch=global_batch // processes * steps)
    return cfg


def rate(recipe: str, processes: int, global_batch: int, steps: int, accelerator: str) -> float:
    """Global samples/s over the timed steps."""
    with tempfile.TemporaryDirectory() as tmp:
        clock, path = f"{tmp}/clock.json", Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(config(recipe, processes, global_batch, steps, accelerator, clock)))
        threads = max(1, (os.cpu_count() or 2) // processes)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).parent)}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "-m", "lightning_vlm", "fit", "--config", str(path)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{recipe} on {processes} process(es) failed:\n{result.stderr[-6000:]}")
        times = json.loads(Path(clock).read_text())
    first = len(times) // 4
    return global_batch * (len(times) - 1 - first) / (times[-1] - times[first])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["clip", "flava", "blip2", "llava"])
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    print(f"{'recipe':<8} {'1 process':>12} {'2 processes':>12} {'ratio':>6}   (samples/s, global batch "
          f"{args.global_batch}, {os.cpu_count()} CPUs)")
    for recipe in args.recipes:
        one, two = (rate(recipe, n, args.global_batch, args.steps, args.accelerator) for n in (1, 2))
        print(f"{recipe:<8} {one:>12.1f} {two:>12.1f} {two / one:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
