"""Data efficiency, the claim MaskVLM makes: MaskVLM, FLAVA and CLIP trained on 10 %, 40 % and 100 % of the
training split under one step budget, with the same encoders, batch and schedule; only the objective differs.

CLIP here is the FLAVA recipe's dual encoder (the same ViT and text encoder) under the CLIP loss, not
`recipes/clip.yaml`'s CNN, so the three differ by objective alone. Each run is a `fit` of its recipe with
``data.train_fraction`` set (a fixed random subset of the shards), validated once at the end on 1,000 val
samples. Prints a markdown table of image->text and text->image recall@5 and zero-shot accuracy.

    python benchmarks/data_efficiency.py                      # 3 x 3 runs of 300 steps x 64 pairs
    python benchmarks/data_efficiency.py --steps 20 --fractions 0.1 1.0 --models clip   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import yaml

from lightning_vlm.cli import read_recipe, run_cli

RECIPES = {"maskvlm": "recipes/maskvlm.yaml", "flava": "recipes/flava.yaml", "clip": "recipes/flava.yaml"}
METRICS = ("val/i2t_r5", "val/t2i_r5", "val/zeroshot_color", "val/zeroshot_shape")


def clip_twin(recipe: dict) -> dict:
    """The FLAVA recipe with its model replaced by a dual encoder of the same encoders under the CLIP loss."""
    twin = copy.deepcopy(recipe)
    args = twin["model"]["init_args"]
    flava = args["model"]["init_args"]
    vision = copy.deepcopy(flava["vision"])
    vision["init_args"]["mask_token"] = False
    twin["model"]["class_path"] = "lightning_vlm.paradigms.contrastive.Contrastive"
    args["model"] = {"class_path": "lightning_vlm.models.contrastive.DualEncoder",
                     "init_args": {"embed_dim": flava["embed_dim"], "vision": vision, "text": flava["text"]}}
    args["loss"] = {"class_path": "lightning_vlm.losses.contrastive.CLIPLoss"}
    return twin


def run(name: str, fraction: float, steps: int, out: Path) -> dict[str, float]:
    """One fit of `name` on `fraction` of the training shards; the val metrics at its end."""
    recipe = read_recipe(RECIPES[name])
    if name == "clip":
        recipe = clip_twin(recipe)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        yaml.safe_dump(recipe, config)
    cli = run_cli(["fit", "--config", config.name, "--data.init_args.train_fraction", str(fraction),
                   "--data.init_args.val_splits", "[val]", "--trainer.max_steps", str(steps),
                   "--trainer.val_check_interval", str(steps), "--trainer.enable_checkpointing", "false",
                   "--trainer.logger.init_args.save_dir", str(out / f"{name}_{fraction}")])
    Path(config.name).unlink()
    return {key: float(cli.trainer.callback_metrics[key]) for key in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.4, 1.0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/data_efficiency"))
    args = parser.parse_args()
    results = {(m, f): run(m, f, args.steps, args.out) for m in args.models for f in args.fractions}
    print(f"\n{args.steps} steps x the recipes' batch; val, 1,000 samples")
    print("| model | " + " | ".join(f"{f:.0%} of train: i2t R@5 / t2i R@5" for f in args.fractions) + " |")
    print("| --- |" + " --- |" * len(args.fractions))
    for m in args.models:
        cells = [f"{results[m, f]['val/i2t_r5']:.3f} / {results[m, f]['val/t2i_r5']:.3f}" for f in args.fractions]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("\nzero-shot colour / shape")
    for m in args.models:
        print(m, [f"{results[m, f]['val/zeroshot_color']:.3f} / {results[m, f]['val/zeroshot_shape']:.3f}"
                  for f in args.fractions])


if __name__ == "__main__":
    main()
