"""What each design of a comparison costs: trainable and total parameters, the image tokens its LM reads, and the
median wall time of a training step relative to the first entry, all entries measured side by side in one run.

    python benchmarks/fusion_designs.py [--config comparisons/adapters.yaml] [--steps 10] [--warmup 2]

Each entry's model is built as `compare` builds its cell (`cell_config`: the recipe, the entry's overrides), with
``init_from`` emptied so no checkpoint is needed (the weights are random; the cost is the design's), and put in the
first phase of its staged-freezing plan, as at step 0 of the cell's fit. A step is forward, backward, gradient
clipping (when the recipe clips) and an AdamW step over the paradigm's parameter groups, on the first batch of the
entry's own DataModule (the recipe's batch size; loading it is not timed). The entries take turns step by step, so a
load that comes and goes on the machine falls on all of them alike; the first `--warmup` rounds are not counted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule

from lightning_vlm.callbacks import StagedFreezing
from lightning_vlm.cli import VLMCLI
from lightning_vlm.compare import Comparison, Entry, load_comparison
from lightning_vlm.compare.cells import cell_config, write_config


@dataclass
class Design:
    """One entry ready to time: its paradigm in its first phase, an optimizer, one batch and its step times."""

    label: str
    paradigm: LightningModule
    optimizer: torch.optim.Optimizer
    batch: dict[str, Any]
    clip: float | None
    times: list[float]


def build(comparison: Comparison, entry: Entry, workdir: Path) -> Design:
    """The entry's paradigm as its comparison cell builds it (no init_from), in the plan's first phase, with the
    first batch of its DataModule."""
    config = cell_config(comparison, entry, comparison.seeds[0], workdir)
    config["model"]["init_args"]["init_from"] = []
    path = write_config(config, workdir / entry.label)
    cli = VLMCLI(args=["--config", str(path), "--trainer.logger", "false", "--data.init_args.num_workers", "0",
                       "--prerequisites", "fail"], run=False, trainer_defaults={})
    paradigm, datamodule = cli.model, cli.datamodule
    plan = next((c for c in cli.trainer.callbacks if isinstance(c, StagedFreezing)), None)
    if plan is not None:
        plan.apply(paradigm, 0)
    datamodule.trainer = type("T", (), {"lightning_module": paradigm, "global_rank": 0, "world_size": 1,
                                        "current_epoch": 0})()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.AdamW(paradigm.parameter_groups(), lr=paradigm.lr, betas=paradigm.betas)
    return Design(entry.label, paradigm, optimizer, batch, cli.trainer.gradient_clip_val, [])


def image_tokens(design: Design) -> int | None:
    """How many tokens each image becomes for the LM (None for a model with no visual prompt)."""
    model = design.paradigm.model
    if not hasattr(model, "visual_prompt"):
        return None
    with torch.no_grad():
        return model.visual_prompt(design.batch["pixel_values"][:1]).shape[1]


def train_step(design: Design) -> float:
    """Seconds for one forward, backward, clipping and optimizer step."""
    paradigm = design.paradigm
    started = time.perf_counter()
    paradigm.loss(paradigm.model_output(design.batch)).total.backward()
    if design.clip:
        torch.nn.utils.clip_grad_norm_([p for p in paradigm.parameters() if p.requires_grad], design.clip)
    design.optimizer.step()
    design.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def table(designs: list[Design]) -> str:
    """The markdown table: parameters, image tokens, median step time and its ratio to the first entry's."""
    rows = ["| entry | trainable params | total params | image tokens | step (median, s) | step vs first |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    first = statistics.median(designs[0].times)
    for design in designs:
        params = list(design.paradigm.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        tokens = image_tokens(design)
        median = statistics.median(design.times)
        rows.append(f"| {design.label} | {trainable:,} | {sum(p.numel() for p in params):,} | "
                    f"{'—' if tokens is None else tokens} | {median:.3f} | {median / first:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="comparisons/adapters.yaml", help="a comparison YAML")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per entry")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per entry first")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # ours come with this script's own
    comparison = load_comparison(args.config)
    with tempfile.TemporaryDirectory() as workdir:
        designs = [build(comparison, entry, Path(workdir)) for entry in comparison.entries]
    for round_ in range(args.warmup + args.steps):
        for design in designs:
            seconds = train_step(design)
            if round_ >= args.warmup:
                design.times.append(seconds)
    batch = len(designs[0].batch["pixel_values"])
    print(f"{args.config}: {args.steps} steps per entry (batch {batch} for the first entry), "
          f"{torch.get_num_threads()} threads\n")
    print(table(designs))


if __name__ == "__main__":
    main()
