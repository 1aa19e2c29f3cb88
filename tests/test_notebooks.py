"""Every notebook runs top to bottom on the tiny benchmark (its code cells executed in order, in one namespace, from
the repository root)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
import torch

REPO = Path(__file__).parents[1]
NOTEBOOKS = sorted(REPO.joinpath("notebooks").glob("*.ipynb"))
# Notebooks that load the packaged SmolLM2: they ask for the `real_checkpoints` fixture and are slow tests.
NEEDS_WEIGHTS = {"04_give_an_lm_sight"}


@pytest.fixture
def weights(request, path):
    """The packaged checkpoints, prepared (in the test's setup, not its run) for the notebooks that need them."""
    if path.stem in NEEDS_WEIGHTS:
        request.getfixturevalue("real_checkpoints")


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] * (p.stem in NEEDS_WEIGHTS))
                                  for p in NOTEBOOKS])
def test_notebook_runs(path, weights, tiny_benchmark, monkeypatch):
    monkeypatch.setenv("LVLM_NOTEBOOK_ROOT", tiny_benchmark)
    monkeypatch.chdir(REPO)
    # One thread: the notebooks' models are tiny, and on a busy machine a second OpenMP thread spinning at every small
    # op made 04 take 60-150 s instead of 6 (two cores shared with another job).
    threads, namespace = torch.get_num_threads(), {}
    torch.set_num_threads(1)
    try:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                exec(compile(cell.source, f"{path.name}", "exec"), namespace)  # noqa: S102 - our own notebooks
    finally:
        torch.set_num_threads(threads)
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")  # a notebook's figures end with it
