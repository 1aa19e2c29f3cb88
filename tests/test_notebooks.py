"""Every notebook runs top to bottom on the tiny benchmark (its code cells executed in order, in one namespace)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted(Path(__file__).parents[1].joinpath("notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tiny_benchmark, monkeypatch):
    monkeypatch.setenv("LVLM_NOTEBOOK_ROOT", tiny_benchmark)
    namespace: dict = {}
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, f"{path.name}", "exec"), namespace)  # noqa: S102 - our own notebooks
