"""Activation checkpointing, part by part: the activation memory a training step keeps for backward and its step
time, without and with ``grad_checkpointing: true`` on each part, measured side by side in one run.

    python benchmarks/grad_checkpointing.py [--recipes clip blip2 llava] [--batch 32] [--steps 8] [--last-phase]

Each recipe trains from scratch (no init_from) on its default data, float32, without validation or checkpoints:
first as written, then with the key on one part at a time (every VisionEncoder, TextEncoder, QFormer and
LanguageModel the recipe builds). A staged recipe trains in its first phase, or with `--last-phase` in its last
(every phase started at step 0: BLIP-2's and LLaVA's stage 2, where the LM trains). "Saved" is the bytes of the
tensors autograd keeps from the forward pass for backward (counted once per storage by a saved-tensors hook), the
memory checkpointing trades for recomputation; on a GPU the peak allocated memory is printed as well. Steps after
the first quarter are timed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from lightning_vlm.cli import VLMCLI, read_recipe

RECIPES = Path(__file__).parents[1] / "recipes"
PARTS = ("VisionEncoder", "TextEncoder", "QFormer", "LanguageModel")


class StepMeter(L.Callback):
    """Step wall times, and the bytes of what each step's forward saved for backward."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.saved: list[int] = []
        self._hooks = None
        self._storages: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.times.append(time.perf_counter())

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._hooks.__exit__(None, None, None)
        self.saved.append(sum(self._storages.values()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times[-1] = time.perf_counter() - self.times[-1]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor


def parts_of(config: dict, path: str = "") -> list[tuple[str, dict]]:
    """Every (config path, init_args) of a checkpointable part in a recipe's model."""
    found = []
    if isinstance(config, dict):
        if str(config.get("class_path", "")).rsplit(".", 1)[-1] in PARTS:
            found.append((path, config.setdefault("init_args", {})))
        for key, value in config.items():
            found += parts_of(value, f"{path}.{key}" if path else key)
    elif isinstance(config, list):
        for index, value in enumerate(config):
            found += parts_of(value, f"{path}[{index}]")
    return found


def measure(config: dict, workdir: Path, meter: StepMeter) -> None:
    """Fit `config` through the CLI with `meter` as the only default callback."""
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    VLMCLI(args=["fit", "--config", str(path)], trainer_defaults={"callbacks": [meter]})


def run(recipe: str, batch: int, steps: int, workdir: Path, last_phase: bool
        ) -> list[tuple[str, float, float, float | None]]:
    base = read_recipe(RECIPES / f"{recipe}.yaml")
    base["trainer"].update(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, precision="32-true",
                           enable_progress_bar=False, enable_checkpointing=False, logger=False,
                           enable_model_summary=False)
    base["trainer"]["callbacks"] = [c for c in base["trainer"].get("callbacks", [])
                                    if c["class_path"].endswith("StagedFreezing")]
    for callback in base["trainer"]["callbacks"]:
        for phase in callback["init_args"]["phases"] if last_phase else []:
            phase.pop("start_epoch", None)
            phase["start_step"] = 0
    base["model"]["init_args"]["init_from"] = []
    base["data"]["init_args"].update(batch_size=batch, num_workers=0, samples_per_epoch=batch * steps)
    rows = []
    for label in ["none", *[path for path, _ in parts_of(base["model"])]]:
        config = yaml.safe_load(yaml.safe_dump(base))
        for path, init_args in parts_of(config["model"]):
            init_args["grad_checkpointing"] = path == label
        meter = StepMeter()
        torch.manual_seed(0)
        measure(config, workdir, meter)
        timed = meter.times[steps // 4:]
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        part = label.rsplit(".", 1)[-1]
        rows.append((part, statistics.median(meter.saved) / 2**20, statistics.median(timed), peak))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["clip", "blip2", "llava"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--last-phase", action="store_true")
    args = parser.parse_args()
    phase = "last" if args.last_phase else "first"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {phase} phase")
    print("| recipe | checkpointed part | saved for backward (MiB) | ratio | step (s) | ratio | GPU peak (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as workdir:
        for recipe in args.recipes:
            rows = run(recipe, args.batch, args.steps, Path(workdir), args.last_phase)
            _, saved0, time0, _ = rows[0]
            for label, saved, step, peak in rows:
                gpu = f"{peak:.0f}" if peak is not None else "-"
                print(f"| {recipe} | {label} | {saved:.1f} | {saved / saved0:.2f} | {step:.3f} | {step / time0:.2f} "
                      f"| {gpu} |", flush=True)


if __name__ == "__main__":
    main()
