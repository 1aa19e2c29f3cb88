"""The real entry point in a fresh process: generate data with the CLI, train, and resume from the checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).parents[1] / "recipes" / "clip.yaml"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lightning_vlm", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_synth_fit_and_resume_from_the_command_line(tmp_path):
    data = tmp_path / "bench"
    run("data", "synth", "--out", str(data), "--train", "256", "--val", "64", "--test", "64",
        "--compositional", "64", "--style-shift", "64", "--samples-per-shard", "64", cwd=tmp_path)
    common = ["--config", str(RECIPE), "--data.init_args.root", str(data),
              "--model.init_args.model.init_args.text.init_args.tokenizer", str(data),
              "--data.init_args.batch_size", "16", "--data.init_args.eval_batch_size", "32",
              "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    run("fit", *common, "--trainer.max_steps", "4", cwd=tmp_path)
    checkpoint = tmp_path / "checkpoints" / "clip" / "last.ckpt"  # the recipe's stable path for later recipes
    assert checkpoint.is_file()
    resumed = run("fit", *common, "--trainer.max_steps", "8", "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    assert len(list((tmp_path / "runs").rglob("events.out.tfevents.*"))) == 2
