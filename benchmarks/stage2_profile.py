"""Where a training step of an image-to-text recipe spends its time (stage 2 by default), and its samples/s.

Builds the recipe's model, puts it in its last staged-freezing phase (for blip2_smollm2.yaml: vision and LM
frozen, LoRA on the LM, Q-Former and projection trained), and times real training steps on real batches, split
into the forward of each top-level part (vision, Q-Former or projector, projection, language model), the
backward and the optimizer step.

    python benchmarks/stage2_profile.py [--config recipes/blip2_smollm2.yaml] [--batch-size 16] [--steps 8]
                                        [--phase -1] [--autocast] [-- CLI overrides ...]

The step runs under bf16 autocast with --autocast (what the trainer's precision "bf16-mixed" does), and anything
after `--` overrides the recipe as on the command line, e.g.
`-- --model.init_args.model.init_args.language_model.init_args.dtype float32` to time the LM in full precision.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from lightning_vlm.callbacks import StagedFreezing
from lightning_vlm.cli import VLMCLI


def timed_parts(model: torch.nn.Module, totals: dict[str, float]) -> None:
    """Accumulate the forward wall time of each top-level part of `model` into `totals` (by hooks); the language
    model's decoder and output layer separately, since its loss calls them directly."""
    parts = dict(model.named_children())
    lm = parts.pop("language_model", None)
    if lm is not None:
        parts.update({"language_model decoder": lm.model.get_decoder(),
                      "language_model output layer": lm.model.get_output_embeddings()})
    for name, child in parts.items():
        started: list[float] = []
        child.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter()))
        child.register_forward_hook(
            lambda *_, s=started, n=name: totals.__setitem__(f"forward {n}", totals[f"forward {n}"]
                                                             + time.perf_counter() - s.pop()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/blip2_smollm2.yaml")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--phase", type=int, default=-1, help="the plan's phase to time (default: the last)")
    parser.add_argument("--autocast", action="store_true", help="run the step under bf16 autocast")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, after --")
    args = parser.parse_args()
    torch.manual_seed(0)

    cli = VLMCLI(args=["--config", args.config, "--model.init_args.init_from", "[]", "--trainer.logger", "false",
                       "--data.init_args.root", args.root, "--data.init_args.batch_size", str(args.batch_size),
                       "--data.init_args.num_workers", "0", *args.overrides], run=False, trainer_defaults={})
    paradigm, datamodule = cli.model.train(), cli.datamodule  # the overrides reach the model, data and plan alike
    next(c for c in cli.trainer.callbacks if isinstance(c, StagedFreezing)).apply(paradigm, args.phase)
    datamodule.trainer = type("T", (), {"lightning_module": paradigm, "global_rank": 0, "world_size": 1,
                                        "current_epoch": 0})()
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    optimizer = torch.optim.AdamW([p for p in paradigm.parameters() if p.requires_grad], lr=1e-4)

    totals: dict[str, float] = defaultdict(float)
    timed_parts(paradigm.model, totals)
    trainable = sum(p.numel() for p in paradigm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in paradigm.parameters())
    wall = 0.0
    for step in range(args.steps + 1):
        batch = next(batches)
        if step == 1:  # the first step warms up allocators and kernels: not counted
            totals.clear()
            wall = 0.0
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            loss = paradigm.loss(paradigm.model_output(batch)).total
        forward_done = time.perf_counter()
        loss.backward()
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        totals["backward"] += backward_done - forward_done
        totals["optimizer"] += end - backward_done
        totals["forward (all)"] += forward_done - start
        wall += end - start

    per_step = wall / args.steps
    print(f"{args.config} {' '.join(args.overrides)}{' (bf16 autocast)' if args.autocast else ''}: "
          f"batch {args.batch_size}, {args.steps} steps, {per_step:.2f} s/step, "
          f"{args.batch_size / per_step:.1f} samples/s; trainable {trainable / 1e6:.2f} M of {total / 1e6:.1f} M")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {seconds / args.steps:7.3f} s/step  {100 * seconds / wall:5.1f} %")


if __name__ == "__main__":
    main()
