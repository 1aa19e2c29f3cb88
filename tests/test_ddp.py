"""DDP stays correct when a staged plan changes what trains: two CPU processes (gloo) fit a tiny BLIP-2 through both
stages and a tiny LLaVA through a LoRA phase, and every parameter ends bit-identical on both ranks. DDP averages
only the gradients of parameters that required grad when it wrapped the model; without re-wrapping at the phase
change, each rank would train its own copy of what the new phase unfroze."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "multiprocess" / "staged_fit.py"


def fit_two_ranks(case: str, root: str, out: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               case, root, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("case, trained_late", [("blip2", "model.language_model."), ("llava_lora", "lora_")])
def test_replicas_stay_identical_across_a_phase_change(case, trained_late, tiny_benchmark, tmp_path):
    ranks = fit_two_ranks(case, tiny_benchmark, tmp_path)
    assert [r["steps"] for r in ranks] == [6, 6]
    late = [name for name in ranks[0]["trained"] if trained_late in name]
    assert late, f"the second phase trains nothing matching {trained_late!r}"
    differ = [name for name, value in ranks[0]["state"].items() if not torch.equal(value, ranks[1]["state"][name])]
    assert differ == []
