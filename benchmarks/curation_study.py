"""Curation by bootstrapping, measured: a noisy copy of the benchmark, a first CLIP trained on it, that CLIP's
CLIPScore curating it (alone, and after caption dedup), then comparisons/curation.yaml (clean vs noisy vs the two
curated copies, one budget, one yardstick).

    python benchmarks/curation_study.py [--noise 0.2] [--keep-fraction 0.8] [--scorer-steps 313]

Each step is skipped when its output exists (delete it to redo). The curation reports (precision and recall of the
noisy pairs removed, by rule) are printed and kept in data/noisy_scored/report.md and data/noisy_curated/report.md;
the comparison writes runs/compare/curation/results.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning_vlm.compare.cells import write_config

NOISY, SCORER = Path("data/noisy"), Path("checkpoints/clip_noisy")
# each curated root with the rules before its CLIPScore
CURATED = {Path("data/noisy_scored"): [], Path("data/noisy_curated"): ["--dedup-captions", "normalized"]}


def run(args: list[str]) -> None:
    """``python -m lightning_vlm ARGS``, failing loudly."""
    subprocess.run([sys.executable, "-m", "lightning_vlm", *args], check=True)


def scorer_override(steps: int, folder: Path) -> Path:
    """recipes/clip.yaml read from the noisy copy for `steps` steps, checkpointing to checkpoints/clip_noisy."""
    override = {
        "trainer": {"max_steps": steps, "val_check_interval": steps, "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(SCORER), "filename": "last", "enable_version_counter": False}}]},
        "data": {"init_args": {"root": str(NOISY)}},
    }
    return write_config(override, folder, "scorer.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.2, help="share of train captions made wrong")
    parser.add_argument("--keep-fraction", type=float, default=0.8, help="share of the pairs CLIPScore keeps")
    parser.add_argument("--scorer-steps", type=int, default=313, help="steps of 128 for the bootstrap scorer")
    args = parser.parse_args()
    if not (NOISY / "dataset.json").is_file():
        run(["data", "synth", "--out", str(NOISY), "--caption-noise", str(args.noise)])
    if not (SCORER / "last.ckpt").is_file():
        with tempfile.TemporaryDirectory() as folder:
            run(["fit", "--config", "recipes/clip.yaml", "--config", str(scorer_override(args.scorer_steps,
                                                                                            Path(folder)))])
    for root, rules in CURATED.items():
        if not (root / "dataset.json").is_file():
            run(["data", "curate", "--in", str(NOISY), "--out", str(root), *rules, "--scorer-config",
                 "recipes/clip.yaml", "--scorer-checkpoint", str(SCORER / "last.ckpt"),
                 "--keep-fraction", str(args.keep_fraction)])
    run(["compare", "--config", "comparisons/curation.yaml"])


if __name__ == "__main__":
    main()
